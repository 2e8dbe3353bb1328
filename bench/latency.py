"""Per-job latency of a 2- and a 3-stage sequence at a 0 ms LM, against a bare Celery chain.

One job at a time, client-observed (submit to result). The bare chain makes the same DSPy calls
with the same LM and adapter, one task per stage on its own queue and worker, like Stagecoach.
Target: Stagecoach <= 1.15x bare.
"""

from typing import Any

from bench.bare import bare_chain, bare_result
from bench.harness import (
    Bench,
    Ratio,
    Scale,
    ScenarioResult,
    Series,
    Stack,
    bare_workers,
    interleave,
    routing_worker,
    stage_workers,
    timed,
    timed_job,
)

SEQUENCES = {"seq2": ("qa", ["key_terms", "answer"]), "seq3": ("bench_seq3", ["key_terms", "answer", "bench_polish"])}
TARGET = 1.15


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    stages = ["key_terms", "answer", "bench_polish"]
    plan = [*stage_workers(stages, 4), routing_worker(), *bare_workers(stages, 4)]
    with bench.stack(0, plan) as stack:
        measures = {}
        for label, (pipeline, chain_stages) in SEQUENCES.items():
            measures[f"{label} stagecoach"] = _series(scale, lambda i, p=pipeline: _stagecoach(stack, p, i))
            measures[f"{label} bare chain"] = _series(scale, lambda i, s=chain_stages: _bare(stack, s, i))
        for index in range(scale.warmup):
            for measure in measures.values():
                measure(-1 - index)
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "ms", samples) for name, samples in rounds.items()}
    ratios = [Ratio(f"{label} stagecoach / bare chain", series[f"{label} stagecoach"],
                    series[f"{label} bare chain"], TARGET) for label in SEQUENCES]
    return ScenarioResult("latency", "Per-job latency, sequence at 0 ms LM vs bare Celery chain",
                          {"lm_latency_ms": 0, "jobs_per_round": scale.jobs, "rounds": scale.rounds,
                           "threads_per_worker": 4}, list(series.values()), ratios)


def _series(scale: Scale, one: Any) -> Any:
    """A round: `scale.jobs` jobs one after another, each timed in ms."""
    return lambda round_: [one(round_ * 1000 + j) * 1000 for j in range(scale.jobs)]


def _inputs(index: int) -> dict[str, Any]:
    return {"question": f"What moves barges on the Rhine? (job {index})"}


def _stagecoach(stack: Stack, pipeline: str, index: int) -> float:
    return timed_job(stack, pipeline, _inputs(index))


def _bare(stack: Stack, stages: list[str], index: int) -> float:
    return timed(lambda: bare_result(bare_chain(stack.client.app, stages, _inputs(index)).apply_async(), 60))
