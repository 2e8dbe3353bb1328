"""Stage fusion: a three-stage chain fused into one task, and with LM-level fusion (the first two
stages share one merged LM call), against the same chain unfused (not a test).

Starts its own Redis server, the test LM at 0 ms latency (so the cost measured is the hops, not
the model), one thread-pool worker per stage queue and a routing worker, then submits jobs one
at a time, rotating the three pipelines, and reports client-observed latency (submit to result)
as a ratio of medians measured in this one run. Target: fused <= 0.7x unfused. The shared stage
cache is off in these fleets, and every input is distinct, so no cache answers.

    python -m bench.fusion [--runs 30] [--warmup 3]
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

CATALOG = [ROOT / "pipelines", ROOT / "bench" / "pipelines" / "fusion.yaml"]
FUSED, UNFUSED, LM_FUSED = "bench_fused3", "bench_unfused3", "bench_lmfused3"
PIPELINES = (UNFUSED, FUSED, LM_FUSED)
STEPS = ("summary", "headline", "terms")
TARGET = 0.7


@contextmanager
def stack() -> Iterator[Client]:
    with private_redis() as redis_url, test_lm_server("--latency-ms", "0") as lm_url:
        fleet = Fleet(worker_env(redis_url, lm_url, CATALOG), Path(tempfile.mkdtemp(prefix="stagecoach-fusion-")))
        for step in STEPS:  # each stage on its own worker, as deployed: unfused jobs hop between them
            queues = [stage_queue(f"{kind}_{step}") for kind in ("fz", "uf", "lm")]
            fleet.start(f"fusion-{step}", queues, concurrency=2)
        fleet.start("fusion-routing", [ROUTING_QUEUE], concurrency=4)
        try:
            fleet.wait_ready()
            yield client_for(redis_url, lm_url, CATALOG)
        finally:
            fleet.stop()


def run_once(client: Client, pipeline: str, index: int) -> float:
    started = time.perf_counter()
    result = client.submit(pipeline, {"document": f"Barges carry coal from Basel to Rotterdam (run {index})."}
                           ).get(timeout=120)
    seconds = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"{pipeline} failed: {result.error}")
    return seconds


def measure(client: Client, runs: int, warmup: int) -> dict[str, list[float]]:
    """Rotated runs, so drift on a busy machine affects every pipeline alike."""
    for index in range(warmup):
        for pipeline in PIPELINES:
            run_once(client, pipeline, -1 - index)
    samples: dict[str, list[float]] = {name: [] for name in PIPELINES}
    for index in range(runs):
        shift = index % len(PIPELINES)
        for pipeline in PIPELINES[shift:] + PIPELINES[:shift]:
            samples[pipeline].append(run_once(client, pipeline, index))
    return samples


def report(samples: dict[str, list[float]]) -> str:
    base = statistics.median(samples[UNFUSED])
    lines = [f"three-stage chain, test LM at 0 ms, {len(samples[FUSED])} runs each",
             f"{'pipeline':<16}{'median ms':>10}{'mean ms':>10}{'min ms':>9}{'max ms':>9}{'ratio':>8}"]
    for name in PIPELINES:
        values = samples[name]
        median = statistics.median(values)
        lines.append(f"{name:<16}{median * 1000:>10.1f}{statistics.mean(values) * 1000:>10.1f}"
                     f"{min(values) * 1000:>9.1f}{max(values) * 1000:>9.1f}{median / base:>8.2f}")
    lines.append(f"ratio = median / median of {UNFUSED}; target <= {TARGET:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    with stack() as client:
        samples = measure(client, args.runs, args.warmup)
    print(report(samples), flush=True)


if __name__ == "__main__":
    main()
