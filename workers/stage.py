"""Run one stage: contract in, DSPy module call, contract out.

The runner never touches Celery; the task wraps it. Inputs are validated against the stage's
input contract, the module is called under `dspy.context` with this stage's LM, and the
prediction is checked against the output contract before it may join the job's state.
"""

import importlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import dspy

from contracts.envelope import Usage
from contracts.errors import ContractError
from contracts.fields import validate
from contracts.specs import LMOverride, StageSpec
from workers.errors import (
    ModuleLoadError,
    PermanentStageError,
    RetryableStageError,
    StageContractError,
    StageError,
    is_transient,
)
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings


@dataclass(frozen=True)
class StageRun:
    outputs: dict[str, Any]
    usage: Usage
    started_at: float
    seconds: float


def load_program(spec: StageSpec) -> dspy.Module:
    """Instantiate the stage's DSPy module from its import path, with saved state if named."""
    target = _import(spec)
    program = _instantiate(spec, target)
    if spec.state:
        try:
            program.load(spec.state)
        except Exception as error:
            raise ModuleLoadError(spec.name, f"cannot load saved state {spec.state}: {error}") from error
    return program


def _import(spec: StageSpec) -> Any:
    module_name, _, attr = spec.module.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ModuleLoadError(spec.name, f"cannot import {spec.module}: {error}") from error
    return target


def _instantiate(spec: StageSpec, target: Any) -> dspy.Module:
    if isinstance(target, type) and issubclass(target, dspy.Signature):
        return dspy.ChainOfThought(target) if spec.program == "chain_of_thought" else dspy.Predict(target)
    program = target(**spec.options)
    if not isinstance(program, dspy.Module):
        raise ModuleLoadError(spec.name, f"{spec.module} did not give a dspy.Module (got {type(program)})")
    return program


class StageRunner:
    """Calls one stage's module; one program instance per thread (modules hold call state)."""

    def __init__(self, spec: StageSpec, lm_settings: LMSettings) -> None:
        self.spec = spec
        self.lm_settings = lm_settings
        self._local = threading.local()

    def program(self) -> dspy.Module:
        if not hasattr(self._local, "program"):
            self._local.program = load_program(self.spec)
        return self._local.program  # type: ignore[no-any-return]

    def run(self, inputs: dict[str, Any], override: LMOverride | None = None) -> StageRun:
        checked = self._check(f"stage '{self.spec.name}' inputs", self.spec.inputs, inputs)
        started = time.time()
        prediction = self._call(checked, override)
        seconds = time.time() - started
        outputs = self._check(f"stage '{self.spec.name}' outputs", self.spec.outputs, self._fields(prediction))
        return StageRun(outputs, _usage(prediction), started, seconds)

    def _check(self, where: str, fields: Any, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return validate(where, fields, data)
        except ContractError as error:
            raise StageContractError(self.spec.name, str(error), [p.field for p in error.problems]) from None

    def _call(self, inputs: dict[str, Any], override: LMOverride | None) -> dspy.Prediction:
        lm = lm_for(self.lm_settings, _merge(self.spec.lm, override))
        try:
            with dspy.context(lm=lm, adapter=adapter_for(self.lm_settings), track_usage=True):
                return self.program()(**inputs)
        except StageError:
            raise
        except Exception as error:
            raise _classify(self.spec.name, error) from error

    def _fields(self, prediction: Any) -> dict[str, Any]:
        data = prediction.toDict() if hasattr(prediction, "toDict") else dict(prediction)
        return {name: data[name] for name in self.spec.outputs if name in data}


def _merge(base: LMOverride | None, top: LMOverride | None) -> LMOverride | None:
    if base is None or top is None:
        return top or base
    return base.model_copy(update=top.model_dump(exclude_none=True))


def _classify(stage: str, error: Exception) -> StageError:
    message = f"{type(error).__name__}: {error}"
    if is_transient(error):
        return RetryableStageError(stage, message)
    return PermanentStageError(stage, message)


def _usage(prediction: Any) -> Usage:
    getter = getattr(prediction, "get_lm_usage", None)
    raw = getter() if getter else None
    total = Usage(calls=0)
    for entry in (raw or {}).values():
        total = total.plus(
            Usage(
                prompt_tokens=int(entry.get("prompt_tokens") or 0),
                completion_tokens=int(entry.get("completion_tokens") or 0),
                calls=1,
            )
        )
    return total
