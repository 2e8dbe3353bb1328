"""One optimisation on the fleet: the proxy built from the catalog, DSPy's optimiser run over it in the
client, the scores before and after, and the winner registered as a new version."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from contracts.catalog import Catalog, iter_nodes, pin_versions
from contracts.envelope import Usage
from contracts.names import versioned
from contracts.specs import PipelineSpec, StageNode, StageSpec
from optimize.journal import Evaluation, Journal
from optimize.optimizers import OptimizerOptions, Trial, TrialRecorder, compile_program
from optimize.program import FleetProgram, FleetRunner
from routing.client import Client
from workers.candidates import CandidateStore
from workers.lm import adapter_for, lm_for
from workers.stage import load_program


@dataclass
class Outcome:
    program: FleetProgram
    trials: list[Trial]
    seconds: float
    jobs: int
    replayed: int
    failed: int
    usage: Usage
    baseline: float | None = None  # devset score before and after, when a devset was given
    optimised: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pipeline_stages(catalog: Catalog, spec: PipelineSpec) -> list[str]:
    """Stage names of a pipeline in the order its tree first reaches them (depth first)."""
    names: list[str] = []
    for node in iter_nodes(pin_versions(catalog, spec).root):
        if isinstance(node, StageNode):
            name = catalog.stage(node.stage, node.version).name
            if name not in names:
                names.append(name)
    return names


def stage_modules(catalog: Catalog, spec: PipelineSpec, wanted: list[str] | None) -> dict[str, dspy.Module]:
    """The stage modules to optimise, loaded as a worker loads them (saved state included): the stages
    named, else every stage of the pipeline that has a predictor."""
    pinned = pin_versions(catalog, spec)
    specs: dict[str, StageSpec] = {}
    for node in iter_nodes(pinned.root):
        if isinstance(node, StageNode):
            stage = catalog.stage(node.stage, node.version)
            specs.setdefault(stage.name, stage)
    unknown = sorted(set(wanted or []) - set(specs))
    if unknown:
        raise ValueError(f"--stage {', '.join(unknown)}: not a stage of pipeline '{spec.name}'; its stages: "
                         f"{', '.join(specs)}")
    modules = {name: load_program(stage) for name, stage in specs.items() if not wanted or name in wanted}
    chosen = {name: module for name, module in modules.items() if module.named_predictors()}
    if not chosen:
        raise ValueError(f"pipeline '{spec.name}': no stage with a DSPy predictor to optimise")
    return chosen


def fleet_program(client: Client, pipeline: str, stages: list[str] | None, journal: Journal,
                  job_timeout: float = 600.0,
                  on_evaluation: Callable[[Evaluation, bool], None] | None = None) -> tuple[FleetProgram, PipelineSpec]:
    """The proxy of `pipeline` (pinned to the version it names, or its latest: a traffic split never
    moves an optimisation between versions)."""
    catalog = client.runtime.catalog
    spec = catalog.pipeline(pipeline)
    settings = client.runtime.settings
    store = CandidateStore.from_url(settings.backend_url, settings.result_expires, settings.sentinel)
    runner = FleetRunner(client, versioned(spec.name, spec.version), store, journal, job_timeout, on_evaluation)
    return FleetProgram(runner, stage_modules(catalog, spec, stages)), spec


def client_lm_context(client: Client) -> Any:
    """The client's LM (for the optimiser's own calls: MIPROv2's proposer, GEPA's reflection) and the
    adapter the workers use, as a dspy.context."""
    settings = client.runtime.settings.lm
    return dspy.context(lm=lm_for(settings), adapter=adapter_for(settings))


def run_optimisation(client: Client, program: FleetProgram, metric: Any, trainset: list[dspy.Example],
                     devset: list[dspy.Example] | None, options: OptimizerOptions,
                     on_trial: Callable[[Trial], None] | None = None) -> Outcome:
    recorder = TrialRecorder(on_trial)
    started = time.perf_counter()
    runner = program._fleet
    with client_lm_context(client), dspy.context(callbacks=[recorder]):
        baseline = _score(program, devset, metric, options) if devset else None
        compiled = compile_program(program, metric, trainset, devset, options)
        optimised = _score(compiled, devset, metric, options) if devset else None
    assert isinstance(compiled, FleetProgram)
    return Outcome(compiled, recorder.trials, time.perf_counter() - started, runner.jobs, runner.replayed,
                   runner.failed, runner.usage, baseline, optimised)


def _score(program: dspy.Module, devset: list[dspy.Example], metric: Any, options: OptimizerOptions) -> float:
    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=options.threads, display_progress=False,
                             max_errors=len(devset) + 1)
    return float(evaluate(program, callback_metadata={"metric_key": "devset"}).score)


def default_journal(state_dir: Path, pipeline: str, options: OptimizerOptions) -> Path:
    return state_dir / "optimize" / f"{pipeline.replace('@', '-v')}-{options.optimizer}-seed{options.seed}.jsonl"
