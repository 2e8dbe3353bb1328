"""CPU-bound stage: two worker processes vs the same module in-process.

`bench_cpu` is pure Python (parsing/retrieval stand-in, no LM). In one process the GIL lets one
call run at a time whatever `dspy.Parallel`'s thread count; a prefork worker with two processes
runs two. Target: Stagecoach >= 1.8x in-process (on 2 cores, with the routing hops on the same cores).
"""

from collections.abc import Callable
from typing import Any

from bench.bare import InProcess, run_in_process
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

STAGE = "bench_cpu"
PROCESSES = 2
TARGET = 1.8


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    burst = max(2, scale.burst // 2)
    plan = [WorkerPlan("stage-bench_cpu", [stage_queue(STAGE)], pool="prefork", concurrency=PROCESSES),
            routing_worker()]
    with bench.stack(0, plan) as stack:
        program = InProcess(stack.client.runtime.catalog, [STAGE])
        label = f"stagecoach, {PROCESSES} processes"
        measures: dict[str, Callable[[int], list[float]]] = {
            label: lambda r: [burst / timed(lambda: _stagecoach(stack, _inputs(burst, r)))],
            "in-process": lambda r: [burst / timed(lambda: _inproc(stack, program, _inputs(burst, r)))],
        }
        for measure in measures.values():
            measure(-1)
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "jobs/s", samples) for name, samples in rounds.items()}
    names = list(series)
    ratios = [Ratio(f"{names[0]} / in-process", series[names[0]], series["in-process"], TARGET, "higher")]
    return ScenarioResult("cpu", "CPU-bound stage: 2 worker processes vs in-process",
                          {"burst": burst, "rounds": scale.rounds, "processes": PROCESSES,
                           "in_process_threads": PROCESSES}, list(series.values()), ratios)


def _inputs(burst: int, round_: int) -> list[dict[str, Any]]:
    return [{"document": f"Barges carry coal from Basel to Rotterdam. (round {round_} job {j})"} for j in range(burst)]


def _stagecoach(stack: Stack, inputs: list[dict[str, Any]]) -> None:
    handles = [stack.client.submit(STAGE, item) for item in inputs]
    for handle in handles:
        if not handle.get(timeout=300).ok:
            raise RuntimeError(f"{STAGE} job {handle.id} failed")


def _inproc(stack: Stack, program: InProcess, inputs: list[dict[str, Any]]) -> None:
    run_in_process(program, stack.lm, inputs, PROCESSES)
