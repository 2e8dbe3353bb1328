"""Errors of the routing layer."""

from contracts.errors import StagecoachError


class PipelineError(StagecoachError):
    """A job could not complete: raised by `JobHandle.get(raise_errors=True)`, logged in results."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        self.job_id = job_id
        super().__init__(message)


class RoutingError(PipelineError):
    """A routing decision could not be made (unknown branch value, bad list field...)."""


class JobTimeoutError(PipelineError):
    """The job did not finish within the time the caller was willing to wait."""


class BrokerUnavailableError(PipelineError):
    """The broker did not accept a job within the publish retry time; names the broker URL."""


class RedisFullError(PipelineError):
    """Redis refused a write because it reached `maxmemory` (with `maxmemory-policy noeviction`, which
    Stagecoach needs): the job was not started. Free memory, raise maxmemory, or shorten retention."""
