"""Fan-out latency: an ensemble of 5 and a parallel group of 3 against one member alone.

Starts its own Redis server, the test LM with a fixed latency per call, a routing worker and one
thread-pool worker per stage queue with enough threads for every member, then submits jobs one
at a time and reports client-observed latency (submit to result). Target: both fan-outs within
1.3x of one member, since their members run at once.

    python -m bench.fanout [--latency-ms 400] [--runs 8]
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.fleet import ROOT, Fleet, client_for, private_redis, test_lm_server, worker_env
from contracts.names import ROUTING_QUEUE, stage_queue
from routing.client import Client

CATALOG = [ROOT / "pipelines", ROOT / "bench" / "pipelines"]
PIPELINES = ("bench_single", "bench_ensemble5", "bench_parallel3")
STAGES = {"solver": 8, "tone": 4, "entities": 4}  # threads per stage worker: at least the fan-out




@contextmanager
def stack(latency_ms: float) -> Iterator[Client]:
    with private_redis() as redis_url, test_lm_server("--latency-ms", str(latency_ms)) as lm_url:
        logdir = Path(tempfile.mkdtemp(prefix="stagecoach-bench-"))
        fleet = Fleet(worker_env(redis_url, lm_url, CATALOG), logdir)
        for stage, threads in STAGES.items():
            fleet.start(f"bench-{stage}", [stage_queue(stage)], concurrency=threads)
        fleet.start("bench-routing", [ROUTING_QUEUE], concurrency=16)
        try:
            fleet.wait_ready()
            yield client_for(redis_url, lm_url, CATALOG)
        finally:
            fleet.stop()


def run_once(client: Client, pipeline: str, index: int) -> float:
    """Seconds from submit to result for one job; distinct inputs so no cache can answer."""
    inputs = {"question": f"What moves barges on the Rhine? (run {index})",
              "document": f"Barges carry coal from Basel to Rotterdam. (run {index})"}
    started = time.perf_counter()
    result = client.submit(pipeline, inputs).get(timeout=120)
    seconds = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"{pipeline} failed: {result.error}")
    return seconds


def measure(client: Client, runs: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved runs, so drift (a busy machine) affects every pipeline alike."""
    for index in range(warmup):
        for pipeline in PIPELINES:
            run_once(client, pipeline, -1 - index)
    samples: dict[str, list[float]] = {name: [] for name in PIPELINES}
    for index in range(runs):
        for pipeline in PIPELINES:
            samples[pipeline].append(run_once(client, pipeline, index))
    return samples


def report(samples: dict[str, list[float]], latency_ms: float) -> str:
    base = statistics.median(samples["bench_single"])
    lines = [f"test LM latency {latency_ms:.0f} ms per call, {len(samples['bench_single'])} runs each",
             f"{'pipeline':<18}{'median ms':>10}{'mean ms':>10}{'min ms':>9}{'max ms':>9}{'ratio':>8}"]
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(f"{name:<18}{median * 1000:>10.0f}{statistics.mean(values) * 1000:>10.0f}"
                     f"{min(values) * 1000:>9.0f}{max(values) * 1000:>9.0f}{median / base:>8.2f}")
    lines.append("ratio = median / median of bench_single; target <= 1.30")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=400.0)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    with stack(args.latency_ms) as client:
        samples = measure(client, args.runs, args.warmup)
    print(report(samples, args.latency_ms), flush=True)


if __name__ == "__main__":
    main()
