"""Scaling curve: throughput of one stage queue served by 1, 2 and 4 worker processes.

Four thread-pool worker processes (2 threads each) serve `stage.solver`; before each burst all but
k of them stop consuming the queue (Celery's `cancel_consumer`), so the configurations interleave
within one run. At a 200 ms LM the ideal is 10 jobs/s per process; what falls short is the
per-job overhead (routing hops, Redis) competing for the machine's cores.
"""

import socket
import time
from typing import Any

from bench.harness import (
    Bench,
    Ratio,
    Scale,
    ScenarioResult,
    Series,
    Stack,
    WorkerPlan,
    interleave,
    routing_worker,
    timed,
)
from contracts.names import stage_queue

LATENCY_MS = 200
THREADS = 2
COUNTS = (1, 2, 4)
QUEUE = stage_queue("solver")


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    burst = max(2, scale.burst // 2)
    plan = [WorkerPlan(f"solver-{i}", [QUEUE], concurrency=THREADS) for i in range(max(COUNTS))]
    with bench.stack(LATENCY_MS, [*plan, routing_worker(16)]) as stack:
        measures = {f"{k} process{'es' if k > 1 else ''}": _series(stack, k, burst) for k in COUNTS}
        for measure in measures.values():
            measure(-1)
        rounds = interleave(scale.rounds, measures)
        _consume(stack, max(COUNTS))
    series = {name: Series(name, "jobs/s", samples) for name, samples in rounds.items()}
    first = series[next(iter(series))]
    ratios = [Ratio(f"{name} / 1 process", s, first, None, "higher") for name, s in list(series.items())[1:]]
    return ScenarioResult("scaling", f"Scaling: one stage queue, 1/2/4 worker processes ({LATENCY_MS} ms LM)",
                          {"lm_latency_ms": LATENCY_MS, "threads_per_process": THREADS, "burst": burst,
                           "rounds": scale.rounds, "ideal_jobs_per_s_per_process": THREADS * 1000 / LATENCY_MS},
                          list(series.values()), ratios)


def _series(stack: Stack, processes: int, burst: int) -> Any:
    def measure(round_: int) -> list[float]:
        _consume(stack, processes)
        return [burst / timed(lambda: _burst(stack, burst, f"{processes}/{round_}"))]
    return measure


def _consume(stack: Stack, processes: int) -> None:
    """Exactly the first `processes` solver workers consume the queue."""
    control = stack.client.app.control
    host = socket.gethostname()
    for index in range(max(COUNTS)):
        destination = [f"solver-{index}@{host}"]
        if index < processes:
            control.add_consumer(QUEUE, destination=destination, reply=True, timeout=5)
        else:
            control.cancel_consumer(QUEUE, destination=destination, reply=True, timeout=5)
    time.sleep(0.2)  # let a worker that just stopped finish what it had reserved


def _burst(stack: Stack, jobs: int, tag: str) -> None:
    handles = [stack.client.submit("bench_single", {"question": f"What moves barges? ({tag}/{j})", "document": "-"})
               for j in range(jobs)]
    for handle in handles:
        if not handle.get(timeout=300).ok:
            raise RuntimeError(f"bench_single job {handle.id} failed")
