"""CPU-bound stage: two worker processes vs the same module in-process, at two stage lengths.

`bench_cpu` (~25 ms a call) and `bench_cpu_long` (~100 ms) are pure Python (parsing/retrieval
stand-ins, no LM). In one process the GIL lets one call run at a time whatever `Module.batch`'s
thread count; a prefork worker with two processes runs two. Each job also costs CPU outside the
stage (the client, Redis, the worker's parent process: several ms), on the same 2 cores, which a
short stage cannot hide. Target (the long stage): Stagecoach >= 1.8x in-process; the short stage
is reported beside it to show where orchestration starts to matter.
"""

from collections.abc import Callable
from functools import partial
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
    run_burst,
    timed,
)
from contracts.names import stage_queue

STAGES = {"long": "bench_cpu_long", "short": "bench_cpu"}  # label -> stage (and pipeline) name
BURST_DIVISOR = {"long": 4, "short": 2}  # jobs per burst: scale.burst / this
PROCESSES = 2
TARGET = 1.8  # for the long stage


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    plan = [WorkerPlan(f"stage-{stage}", [stage_queue(stage)], pool="prefork", concurrency=PROCESSES)
            for stage in STAGES.values()]
    with bench.stack(0, [*plan, routing_worker()]) as stack:
        measures: dict[str, Callable[[int], list[float]]] = {}
        for label, stage in STAGES.items():
            program = InProcess(stack.client.runtime.catalog, [stage])
            burst = max(2, scale.burst // BURST_DIVISOR[label])
            measures[f"{label} stage: stagecoach, {PROCESSES} processes"] = _rate(
                burst, partial(run_burst, stack, stage))
            measures[f"{label} stage: in-process"] = _rate(burst, partial(_inproc, stack, program))
        for measure in measures.values():
            measure(-1)
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "jobs/s", samples) for name, samples in rounds.items()}
    ratios = [Ratio(f"{label} stage ({STAGE_MS[label]}), {PROCESSES} processes / in-process",
                    series[f"{label} stage: stagecoach, {PROCESSES} processes"], series[f"{label} stage: in-process"],
                    TARGET if label == "long" else None, "higher") for label in STAGES]
    return ScenarioResult("cpu", "CPU-bound stage: 2 worker processes vs in-process",
                          {"bursts": {label: max(2, scale.burst // d) for label, d in BURST_DIVISOR.items()},
                           "rounds": scale.rounds, "processes": PROCESSES, "in_process_threads": PROCESSES},
                          list(series.values()), ratios)


STAGE_MS = {"long": "~100 ms", "short": "~25 ms"}  # a call's CPU time here, as the stage specs say


def _rate(burst: int, action: Callable[[list[dict[str, Any]]], None]) -> Callable[[int], list[float]]:
    """A round: one burst through `action`, in jobs per second."""
    return lambda round_: [burst / timed(lambda: action(_inputs(burst, round_)))]


def _inputs(burst: int, round_: int) -> list[dict[str, Any]]:
    return [{"document": f"Barges carry coal from Basel to Rotterdam. (round {round_} job {j})"} for j in range(burst)]


def _inproc(stack: Stack, program: InProcess, inputs: list[dict[str, Any]]) -> None:
    run_in_process(program, stack.lm, inputs, PROCESSES)
