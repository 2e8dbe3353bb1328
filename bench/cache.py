"""Shared stage cache: a job seen before (warm) against the same job the first time (cold).

The `qa` pipeline (two stages, one worker per stage queue) at a 200 ms LM, with the fleet's shared
Redis stage cache on and the LM pinned at temperature 0 (sampled calls are not cached). Each round
submits fresh inputs one job at a time (cold: every stage calls the LM), then the same inputs
again (warm: every stage is answered by the shared cache, checked on each JobResult's timings).
Client-observed latency, submit to result. Target: warm <= 1/20 of cold.
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
    interleave,
    routing_worker,
    stage_workers,
    timed,
)
from contracts.jobs import JobResult

PIPELINE = "qa"
STAGES = ["key_terms", "answer"]
LATENCY_MS = 200
THREADS = 4
TARGET = 0.05


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    jobs = max(1, scale.jobs // 2)  # a cold job waits for the LM twice: fewer per round than latency's
    plan = [*stage_workers(STAGES, THREADS), routing_worker()]
    with bench.stack(LATENCY_MS, plan, shared_cache=True) as stack:
        measures = {"cold job": _series(stack, jobs, _cold), "warm job": _series(stack, jobs, _warm)}
        for measure in measures.values():  # cold fills the cache that warm then reads: keep this order
            measure(-1)
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "ms", samples) for name, samples in rounds.items()}
    ratios = [Ratio("warm / cold", series["warm job"], series["cold job"], TARGET)]
    return ScenarioResult("cache", f"Shared stage cache: warm vs cold job ({PIPELINE}, {LATENCY_MS} ms LM)",
                          {"pipeline": PIPELINE, "lm_latency_ms": LATENCY_MS, "jobs_per_round": jobs,
                           "rounds": scale.rounds, "threads_per_worker": THREADS},
                          list(series.values()), ratios,
                          ["warm: every stage of every job answered by the shared cache (checked per job)"])


def _series(stack: Stack, jobs: int, check: Callable[[JobResult], None]) -> Callable[[int], list[float]]:
    """A round: `jobs` jobs one after another, each timed in ms; job j of a round has the same inputs
    in both series."""
    return lambda round_: [_job(stack, _inputs(round_, j), check) * 1000 for j in range(jobs)]


def _inputs(round_: int, job: int) -> dict[str, Any]:
    return {"question": f"What moves barges on the Rhine? (round {round_} job {job})"}


def _job(stack: Stack, inputs: dict[str, Any], check: Callable[[JobResult], None]) -> float:
    def job() -> None:
        result = stack.client.submit(PIPELINE, inputs).get(timeout=60)
        if not result.ok:
            raise RuntimeError(f"{PIPELINE} failed: {result.error}")
        check(result)
    return timed(job)


def _cold(result: JobResult) -> None:
    if result.cached_stages:
        raise RuntimeError(f"cold job {result.job_id} was served by a cache: {_caches(result)}")


def _warm(result: JobResult) -> None:
    from_cache = [t.cached and t.cache == "shared" for t in result.timings]
    if len(from_cache) != len(STAGES) or not all(from_cache):
        raise RuntimeError(f"warm job {result.job_id}: not every stage came from the shared cache: {_caches(result)}")


def _caches(result: JobResult) -> dict[str, str | None]:
    """Per node, which cache answered it (None: the LM did)."""
    return {t.node: t.cache for t in result.timings}
