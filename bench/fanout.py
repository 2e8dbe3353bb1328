"""Fan-out latency: an ensemble of 5, a parallel group of 3 and a map over 4 items vs one member.

One job at a time at a fixed LM latency, client-observed. The members run at once (enough threads
on every stage queue), so a fan-out should cost little more than one member: the routing hop and
the chord's fan-in. Targets: ensemble of 5 <= 1.3x, map over 4 <= 1.4x, parallel of 3 <= 1.3x.
"""

from typing import Any

from bench.harness import (
    Bench,
    Ratio,
    Scale,
    ScenarioResult,
    Series,
    Stack,
    interleave,
    routing_worker,
    stage_workers,
    timed,
)

LATENCY_MS = 400
PIPELINES = {"one member": "bench_single", "ensemble of 5": "bench_ensemble5",
             "parallel of 3": "bench_parallel3", "map over 4": "bench_map4"}
TARGETS = {"ensemble of 5": 1.3, "parallel of 3": 1.3, "map over 4": 1.4}


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    jobs = max(1, scale.jobs // 5)  # each job waits for the LM: fewer per round than latency's
    plan = [*stage_workers(["solver"], 8), *stage_workers(["tone", "entities"], 4), routing_worker(16)]
    with bench.stack(LATENCY_MS, plan) as stack:
        measures = {label: _series(stack, pipeline, jobs) for label, pipeline in PIPELINES.items()}
        for measure in measures.values():
            measure(-1)
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "ms", samples) for name, samples in rounds.items()}
    ratios = [Ratio(f"{label} / one member", series[label], series["one member"], target)
              for label, target in TARGETS.items()]
    return ScenarioResult("fanout", f"Fan-out latency vs one member ({LATENCY_MS} ms LM)",
                          {"lm_latency_ms": LATENCY_MS, "jobs_per_round": jobs, "rounds": scale.rounds},
                          list(series.values()), ratios)


def _series(stack: Stack, pipeline: str, jobs: int) -> Any:
    return lambda round_: [_job(stack, pipeline, round_ * 1000 + j) * 1000 for j in range(jobs)]


def _inputs(pipeline: str, index: int) -> dict[str, Any]:
    """Distinct inputs per job so no cache can answer."""
    document = f"Barges carry coal from Basel to Rotterdam. (job {index})"
    if pipeline == "bench_map4":
        return {"questions": [f"What moves barges on the Rhine? (job {index} item {i})" for i in range(4)],
                "document": document}
    return {"question": f"What moves barges on the Rhine? (job {index})", "document": document}


def _job(stack: Stack, pipeline: str, index: int) -> float:
    def job() -> None:
        result = stack.client.submit(pipeline, _inputs(pipeline, index)).get(timeout=120)
        if not result.ok:
            raise RuntimeError(f"{pipeline} failed: {result.error}")
    return timed(job)
