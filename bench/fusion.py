"""Stage fusion: a three-stage chain fused into one task, and with LM-level fusion (the first two
stages share one merged LM call), against the same chain unfused.

`bench/pipelines/fusion.yaml` holds the chain (summary -> headline -> key terms) three times:
`uf_*` stages unfused (three tasks), `fz_*` stages `fusible: true` (one `stage.fused` task), `lm_*`
stages `fusible: lm` (one task, summary and headline in one merged LM call). The test LM answers at
0 ms, so what is measured is the hops and the stage machinery, not a model. Each step has its own
worker serving that step's queue for all three chains, as deployed: unfused jobs hop between
workers, fused ones stay on the first. One job at a time, client-observed (submit to result), every
input distinct and the shared cache off. Target: fused <= 0.7x unfused (both kinds of fusion).
"""

from collections.abc import Callable
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
    timed_job,
)
from contracts.names import stage_queue

PIPELINES = {"unfused (3 tasks)": "bench_unfused3", "fused (1 task)": "bench_fused3",
             "LM-fused (1 task, 2 LM calls)": "bench_lmfused3"}
RATIOS = {"fused (1 task) / unfused": "fused (1 task)", "LM-fused / unfused": "LM-fused (1 task, 2 LM calls)"}
BASELINE = "unfused (3 tasks)"
STEPS = ("summary", "headline", "terms")
KINDS = ("uf", "fz", "lm")  # stage name prefixes in fusion.yaml: unfused, fused, LM-fused
THREADS = 2
TARGET = 0.7


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    with bench.stack(0, [*_step_workers(), routing_worker(4)]) as stack:
        measures = {label: _series(stack, pipeline, scale.jobs) for label, pipeline in PIPELINES.items()}
        for index in range(scale.warmup):
            for measure in measures.values():
                measure(-1 - index)
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "ms", samples) for name, samples in rounds.items()}
    ratios = [Ratio(name, series[label], series[BASELINE], TARGET) for name, label in RATIOS.items()]
    return ScenarioResult("fusion", "Stage fusion: a three-stage chain fused vs unfused (0 ms LM)",
                          {"lm_latency_ms": 0, "jobs_per_round": scale.jobs, "rounds": scale.rounds,
                           "threads_per_worker": THREADS}, list(series.values()), ratios)


def _step_workers() -> list[WorkerPlan]:
    """One worker per step, serving that step's queue of every chain."""
    return [WorkerPlan(f"fusion-{step}", [stage_queue(f"{kind}_{step}") for kind in KINDS], concurrency=THREADS)
            for step in STEPS]


def _series(stack: Stack, pipeline: str, jobs: int) -> Callable[[int], list[float]]:
    """A round: `jobs` jobs one after another, each timed in ms."""
    return lambda round_: [_job(stack, pipeline, round_ * 1000 + j) * 1000 for j in range(jobs)]


def _inputs(index: int) -> dict[str, Any]:
    return {"document": f"Barges carry coal from Basel to Rotterdam (job {index})."}


def _job(stack: Stack, pipeline: str, index: int) -> float:
    return timed_job(stack, pipeline, _inputs(index))
