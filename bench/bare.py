"""The baselines: a bare Celery chain and the same DSPy program in-process.

`register` is a plugin (`STAGECOACH_PLUGINS`) that adds one plain task per stage,
`bench.bare.<stage>` on its own queue: state dict in, module call under the same LM and adapter
the stage runner uses, state dict out. No envelope, no contracts, no status writes, no routing
hops: what a hand-written Celery chain making the same DSPy calls would do.
"""

import threading
import time
from typing import Any

import dspy
from celery import Celery, chain
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from contracts.catalog import Catalog
from contracts.names import bench_bare_task
from contracts.specs import StageSpec
from routing.client import NOTIFICATION_WAIT, notified_or_stored
from workers.lm import adapter_for, lm_for
from workers.runtime import Runtime
from workers.settings import LMSettings
from workers.stage import load_program


def register(runtime: Runtime) -> None:
    for spec in runtime.catalog.stages.values():
        _register(runtime.app, spec, runtime.settings.lm)


def _register(app: Celery, spec: StageSpec, lm: LMSettings) -> None:
    call = BareCall(spec, lm)
    name = bench_bare_task(spec.name)

    @app.task(name=name, shared=False, queue=name, acks_late=True)
    def bare(state: dict[str, Any]) -> dict[str, Any]:
        return {**state, **call(state)}


class BareCall:
    """One stage's module, one instance per thread, called with the stage's input fields."""

    def __init__(self, spec: StageSpec, lm: LMSettings) -> None:
        self.spec = spec
        self.lm = lm_for(lm)
        self.adapter = adapter_for(lm)
        self._local = threading.local()

    def __call__(self, state: dict[str, Any]) -> dict[str, Any]:
        if not hasattr(self._local, "program"):
            self._local.program = load_program(self.spec)
        inputs = {name: state[name] for name in self.spec.inputs if name in state}
        with dspy.context(lm=self.lm, adapter=self.adapter):
            prediction = self._local.program(**inputs)
        return {name: prediction[name] for name in self.spec.outputs}


def bare_result(result: AsyncResult, timeout: float) -> Any:
    """A bare chain's result, waited for as the Stagecoach client waits for a job's (routing/client.py:
    JobHandle.get), so both sides wait alike."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return notified_or_stored(result, min(NOTIFICATION_WAIT, max(deadline - time.monotonic(), 0.0)))
        except CeleryTimeout:
            if time.monotonic() >= deadline:
                raise


def bare_chain(app: Celery, stages: list[str], state: dict[str, Any]) -> Signature:
    """The chain a Celery user would write by hand for these stages."""
    first, *rest = stages
    sigs = [app.signature(bench_bare_task(first), args=(state,), queue=bench_bare_task(first))]
    sigs += [app.signature(bench_bare_task(name), queue=bench_bare_task(name)) for name in rest]
    return chain(*sigs)


class InProcess(dspy.Module):
    """The same stages as one DSPy program in one process (for Module.batch / dspy.Parallel)."""

    def __init__(self, catalog: Catalog, stages: list[str]) -> None:
        super().__init__()
        self.specs = [catalog.stage(name) for name in stages]
        self.programs = [load_program(spec) for spec in self.specs]

    def forward(self, **state: Any) -> dspy.Prediction:
        for spec, program in zip(self.specs, self.programs, strict=True):
            prediction = program(**{name: state[name] for name in spec.inputs if name in state})
            state.update({name: prediction[name] for name in spec.outputs})
        return dspy.Prediction(**state)


def run_in_process(program: InProcess, lm: LMSettings, inputs: list[dict[str, Any]], threads: int) -> list[Any]:
    """Every input through the program with `threads` at once, under the workers' LM and adapter."""
    examples = [dspy.Example(**item).with_inputs(*item) for item in inputs]
    with dspy.context(lm=lm_for(lm), adapter=adapter_for(lm)):
        return list(program.batch(examples, num_threads=threads, disable_progress_bar=True,
                                  provide_traceback=True))
