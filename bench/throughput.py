"""LM-bound throughput at equal total LM concurrency: the `qa` pipeline vs the same program in-process.

A burst of jobs at a 200 ms LM (200 jobs at full size, the issue's own setup: a two-stage pipeline
fills and drains once per burst, which a smaller burst overweights). Stagecoach and the bare chain
get 4 threads on each of the two stage queues (8 LM calls at once); the in-process program runs
`Module.batch` on 8 threads. Ideal: 8 / (2 x 0.2 s) = 20 jobs/s. Target: Stagecoach >= 0.95x in-process.
"""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench.bare import InProcess, bare_chain, bare_result, run_in_process
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
    run_burst,
    stage_workers,
    timed,
)

STAGES = ["key_terms", "answer"]
LATENCY_MS = 200
THREADS = 4  # per stage queue; in-process gets THREADS * len(STAGES)
TARGET = 0.95
BURST_FACTOR = 2  # bursts of 2 x scale.burst jobs




def run(bench: Bench, scale: Scale) -> ScenarioResult:
    scale = replace(scale, burst=scale.burst * BURST_FACTOR)
    plan = [*stage_workers(STAGES, THREADS), routing_worker(16), *bare_workers(STAGES, THREADS)]
    with bench.stack(LATENCY_MS, plan) as stack:
        program = InProcess(stack.client.runtime.catalog, STAGES)
        measures: dict[str, Callable[[int], list[float]]] = {
            "stagecoach": lambda r: [_rate(scale.burst, lambda: run_burst(stack, "qa", _burst(scale, r)))],
            "bare chain": lambda r: [_rate(scale.burst, lambda: _bare(stack, _burst(scale, r)))],
            "in-process": lambda r: [_rate(scale.burst, lambda: _inproc(stack, program, _burst(scale, r)))],
        }
        for measure in measures.values():
            measure(-1)  # warm-up burst: programs loaded, connections open
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "jobs/s", samples) for name, samples in rounds.items()}
    ratios = [Ratio("stagecoach / in-process", series["stagecoach"], series["in-process"], TARGET, "higher"),
              Ratio("stagecoach / bare chain", series["stagecoach"], series["bare chain"], None, "higher")]
    ideal = THREADS * len(STAGES) / (len(STAGES) * LATENCY_MS / 1000)
    return ScenarioResult("throughput", "LM-bound throughput at equal LM concurrency (qa, 200 ms LM)",
                          {"lm_latency_ms": LATENCY_MS, "burst": scale.burst, "rounds": scale.rounds,
                           "threads_per_stage": THREADS, "in_process_threads": THREADS * len(STAGES),
                           "ideal_jobs_per_s": ideal}, list(series.values()), ratios)


def _burst(scale: Scale, round_: int) -> list[dict[str, Any]]:
    return [{"question": f"Why do barges use the Rhine? (round {round_} job {j})"} for j in range(scale.burst)]


def _rate(jobs: int, action: Any) -> float:
    return jobs / timed(action)


def _bare(stack: Stack, inputs: list[dict[str, Any]]) -> None:
    results = [bare_chain(stack.client.app, STAGES, item).apply_async() for item in inputs]
    for result in results:
        bare_result(result, 300)


def _inproc(stack: Stack, program: InProcess, inputs: list[dict[str, Any]]) -> None:
    outputs = run_in_process(program, stack.lm, inputs, THREADS * len(STAGES))
    if any(out is None for out in outputs):
        raise RuntimeError("an in-process call failed")
