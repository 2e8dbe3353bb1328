"""DSPy's optimisers on the fleet (issue 21): wall time against the same optimiser in-process, and a rerun's LM calls.

- LM-bound: MIPROv2 tunes `qa` (two LM stages) with `THREADS` evaluations at once, in-process (the
  pipeline as a plain DSPy module, `THREADS` threads) and on the fleet (`THREADS` jobs in flight, stage
  workers with as many threads): the same total LM concurrency. Target: fleet >= 0.9x in-process speed.
- CPU-bound: the same optimiser on `bench_opt_cpu`, whose one stage does ~100 ms of pure Python before
  its LM call, with 2 evaluations at once: in-process the GIL runs one stage's CPU work at a time; on
  the fleet two prefork worker processes run two. Target: fleet >= 1.7x.
- Rerun: the same MIPROv2 run twice with the same seed and a fresh journal, the shared stage cache on
  and DSPy's in-memory cache on in the client (as `stagecoach optimize` runs by default): the second
  run's LM calls (counted at the test LM server) over the first's. Target: <= 0.1.
The optimiser's own LM calls (MIPROv2's instruction proposer) run in the client in both settings.
"""

import json
import urllib.request
from typing import Any

import dspy

from bench.harness import Bench, Ratio, Scale, ScenarioResult, Series, Stack, WorkerPlan, interleave, routing_worker
from bench.harness import timed as timed_call
from bench.modules import CpuAnswer
from contracts.names import stage_queue
from examples.basic import Answer, KeyTerms
from optimize.journal import Journal
from optimize.optimizers import OptimizerOptions, compile_program
from optimize.run import fleet_program
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings

THREADS = 4
CPU_THREADS = 2  # = the CPU stage's worker processes
LATENCY_MS = 100
CPU_LATENCY_MS = 5
QUESTIONS = [f"What is fact number {i} about the river {name}?" for i, name in
             enumerate(["Rhine", "Danube", "Elbe", "Oder", "Loire", "Seine", "Po", "Ebro", "Tagus", "Vistula",
                        "Volga", "Dnieper", "Thames", "Shannon", "Tiber", "Arno", "Drava", "Sava"])]


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    options = _options(scale)
    cpu_options = OptimizerOptions(**{**vars(options), "threads": CPU_THREADS})
    train, dev = _examples(scale)
    qa_workers = [WorkerPlan("stage-qa", [stage_queue("key_terms"), stage_queue("answer")], concurrency=2 * THREADS),
                  routing_worker()]
    with bench.stack(LATENCY_MS, qa_workers) as stack:
        qa = interleave(scale.rounds, {
            "qa: in-process": lambda r: [timed_call(lambda: _in_process(stack.lm, QA(), options, train, dev))],
            "qa: fleet": lambda r: [timed_call(lambda: _on_fleet(stack, "qa", options, train, dev))]})
    cpu_workers = [WorkerPlan("stage-cpu", [stage_queue("bench_cpu_answer")], pool="prefork",
                              concurrency=CPU_THREADS), routing_worker()]
    with bench.stack(CPU_LATENCY_MS, cpu_workers) as stack:
        cpu = interleave(scale.rounds, {
            "cpu: in-process": lambda r: [timed_call(lambda: _in_process(stack.lm, CpuProgram(), cpu_options,
                                                                        train, dev))],
            f"cpu: fleet, {CPU_THREADS} processes": lambda r: [timed_call(
                lambda: _on_fleet(stack, "bench_opt_cpu", cpu_options, train, dev))]})
    with bench.stack(LATENCY_MS, qa_workers, shared_cache=True) as stack:
        first, second = _rerun_calls(stack, options, train, dev)
    series = {name: Series(name, "s", samples) for name, samples in {**qa, **cpu}.items()}
    calls = {"rerun: first run LM calls": Series("rerun: first run LM calls", "calls", [[first]]),
             "rerun: second run LM calls": Series("rerun: second run LM calls", "calls", [[second]])}
    ratios = [
        Ratio("MIPROv2 on qa, LM-bound: in-process time / fleet time (same LM concurrency)",
              series["qa: in-process"], series["qa: fleet"], 0.9, "higher"),
        Ratio(f"MIPROv2 on a CPU-bound stage: in-process time / fleet time ({CPU_THREADS} worker processes)",
              series["cpu: in-process"], series[f"cpu: fleet, {CPU_THREADS} processes"], 1.7, "higher"),
        Ratio("rerun with the same seed: LM calls / first run's", calls["rerun: second run LM calls"],
              calls["rerun: first run LM calls"], 0.1, "lower"),
    ]
    params = {"optimizer": "mipro", "trials": options.trials, "candidates": options.candidates,
              "trainset": len(train), "devset": len(dev), "threads": THREADS, "cpu_threads": CPU_THREADS,
              "lm_latency_ms": LATENCY_MS, "rounds": scale.rounds}
    return ScenarioResult("optimize", "DSPy optimisers on the fleet vs in-process", params,
                          [*series.values(), *calls.values()], ratios,
                          notes=["MIPROv2's instruction proposer calls the LM from the client in both settings"])


def _options(scale: Scale) -> OptimizerOptions:
    trials = 2 if scale.name == "smoke" else 6
    return OptimizerOptions(optimizer="mipro", threads=THREADS, auto=None, trials=trials, candidates=3, seed=5,
                            max_bootstrapped_demos=2, max_labeled_demos=1)


def _examples(scale: Scale) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """6 training and 12 development examples (2 and 2 at smoke size): evaluations, which run in parallel,
    outweigh MIPROv2's sequential bootstrapping."""
    train, dev = (2, 2) if scale.name == "smoke" else (6, 12)
    items = [dspy.Example(question=q, answer="unknown").with_inputs("question") for q in QUESTIONS[:train + dev]]
    return items[:train], items[train:]


def metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Deterministic and candidate-dependent enough to give MIPROv2 scores to compare."""
    return len(str(getattr(prediction, "answer", ""))) % 3 != 0


class QA(dspy.Module):
    """`qa` written as plain DSPy (the in-process side)."""

    def __init__(self) -> None:
        super().__init__()
        self.key_terms = dspy.Predict(KeyTerms)
        self.answer = dspy.Predict(Answer)

    def forward(self, question: str) -> dspy.Prediction:
        out = self.answer(question=question, key_terms=self.key_terms(question=question).key_terms)
        return dspy.Prediction(answer=out.answer, confidence=out.confidence)


class CpuProgram(dspy.Module):
    """`bench_opt_cpu` written as plain DSPy."""

    def __init__(self) -> None:
        super().__init__()
        self.bench_cpu_answer = CpuAnswer()

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=self.bench_cpu_answer(question=question).answer)


def _in_process(lm: LMSettings, program: dspy.Module, options: OptimizerOptions, train: list[dspy.Example],
                dev: list[dspy.Example]) -> dspy.Module:
    with dspy.context(lm=lm_for(lm), adapter=adapter_for(lm)):
        return compile_program(program, metric, train, dev, options)


def _on_fleet(stack: Stack, pipeline: str, options: OptimizerOptions, train: list[dspy.Example],
              dev: list[dspy.Example], client_lm: LMSettings | None = None) -> dspy.Module:
    program, _ = fleet_program(stack.client, pipeline, None, Journal(None, False))
    lm = client_lm or stack.lm
    with dspy.context(lm=lm_for(lm), adapter=adapter_for(lm)):
        return compile_program(program, metric, train, dev, options)


def _rerun_calls(stack: Stack, options: OptimizerOptions, train: list[dspy.Example],
                 dev: list[dspy.Example]) -> tuple[float, float]:
    """LM calls of a first and a second identical fleet run (shared cache on, client LM cached in memory)."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    cached = stack.lm.model_copy(update={"cache": True})
    counts: list[float] = []
    for _ in range(2):
        before = _lm_requests(stack)
        _on_fleet(stack, "qa", options, train, dev, cached)
        counts.append(_lm_requests(stack) - before)
    return counts[0], counts[1]


def _lm_requests(stack: Stack) -> float:
    base = str(stack.lm.api_base).removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as reply:
        return float(json.loads(reply.read())["counts"].get("requests", 0))


