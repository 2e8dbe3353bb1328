"""What a stage's `on_error` strategy makes of an error once its retries are spent.

- `fail` (the default): the error is recorded, and ends the job when the node is critical;
- `skip`: recorded, and the job goes on without the stage's outputs;
- `fallback` with a `value`: that value (checked against the output contract) stands in;
- `fallback` with a `stage`: that stage runs inline on the same state, its outputs stand in.
Each recovery is a decision in the job's trail, so the JobResult says what stood in and why.
"""

from typing import Any

from contracts.envelope import Decision, Envelope, ErrorRecord, StageTiming
from contracts.errors import ContractError
from contracts.fields import validate
from contracts.specs import StageNode, StageSpec
from workers.errors import StageError
from workers.stage import StageRunner


def recover(job: Envelope, node: StageNode, path: str, spec: StageSpec, record: ErrorRecord,
            fallbacks: dict[str, StageRunner], worker: str) -> Envelope:
    """The job after the stage's error `record`, as its `on_error` strategy decides."""
    policy = spec.on_error
    if policy.strategy == "fail":
        return job.with_error(record, fatal=node.critical)
    logged = job.with_error(record, fatal=False)
    if policy.strategy == "skip":
        return logged.with_decision(recovery_decision(path, "skip", record))
    if policy.value is not None:
        return fallback_value(logged, node, path, spec, record, policy.value)
    return fallback_stage(logged, node, path, record, fallbacks[str(policy.stage)], worker)


def fallback_value(job: Envelope, node: StageNode, path: str, spec: StageSpec, record: ErrorRecord,
                   value: dict[str, Any]) -> Envelope:
    try:
        outputs = validate(f"stage '{spec.name}' on_error fallback value", spec.outputs, value)
    except ContractError as bad:
        return job.with_error(ErrorRecord(node=path, stage=spec.name, kind="contract",
                                          error_type="ContractError", message=str(bad)), fatal=node.critical)
    decided = job.with_decision(recovery_decision(path, "fallback", record, {"value": outputs}))
    return decided.with_output(path, outputs, rename=node.outputs)


def fallback_stage(job: Envelope, node: StageNode, path: str, record: ErrorRecord, runner: StageRunner,
                   worker: str) -> Envelope:
    name = runner.spec.name
    decided = job.with_decision(recovery_decision(path, "fallback", record, {"stage": name}))
    try:
        run = runner.run(job.pick(list(runner.spec.inputs)))  # its own contract's fields, by name
    except StageError as error:  # the fallback failed too: that ends it
        failed = ErrorRecord(node=path, stage=name, kind=error.kind,  # type: ignore[arg-type]
                             error_type=type(error).__name__, message=f"fallback stage '{name}': {error}",
                             fields=error.fields)
        return decided.with_error(failed, fatal=node.critical)
    timing = StageTiming(node=path, stage=name, identity=runner.spec.identity, worker=worker,
                         started_at=run.started_at, seconds=run.seconds)
    return decided.with_output(path, run.outputs, timing, run.usage, node.outputs)


def recovery_decision(path: str, choice: str, record: ErrorRecord, detail: dict[str, Any] | None = None) -> Decision:
    return Decision(node=path, kind="recovery", choice=choice, detail={"error": record.message, **(detail or {})})


def cancelled_record(path: str, stage: str | None) -> ErrorRecord:
    return ErrorRecord(node=path, stage=stage, kind="cancelled", error_type="JobCancelledError",
                       message="job cancelled by an operator (`stagecoach cancel`)")
