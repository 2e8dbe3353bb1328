"""Errors raised inside stage workers: retryable (transient LM trouble) vs permanent."""

from contracts.errors import StagecoachError


class StageError(StagecoachError):
    """A stage call failed. `retryable` tells whether trying again later may succeed."""

    retryable = False
    kind = "stage"

    def __init__(self, stage: str, message: str, fields: list[str] | None = None) -> None:
        self.stage = stage
        self.fields = fields or []
        super().__init__(f"stage '{stage}': {message}")


class RetryableStageError(StageError):
    """Transient: connection refused or reset, timeouts, HTTP 408/409/429/5xx from the LM."""

    retryable = True
    kind = "lm"


class PermanentStageError(StageError):
    """Retrying cannot help: bad contract data, an output the LM cannot be made to produce, a bug."""


class StageContractError(PermanentStageError):
    kind = "contract"


class StageTimeoutError(PermanentStageError):
    kind = "timeout"


class ModuleLoadError(PermanentStageError):
    """The stage's DSPy module or saved state could not be loaded."""


class PoisonMessageError(StagecoachError):
    """A broker message no worker can run (undecodable, wrongly shaped, foreign serialiser, too big)."""


class JobCancelledError(StagecoachError):
    """An operator cancelled the job (`stagecoach cancel`)."""


_TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_TRANSIENT_NAMES = (
    "Timeout", "ConnectError", "ConnectionError", "RateLimit", "ServiceUnavailable", "APIConnection",
    "InternalServerError", "RemoteProtocolError", "ReadError", "BadGateway",
)


def is_timeout(error: BaseException) -> bool:
    """Whether an LM client error is a timeout (litellm.Timeout, httpx/openai timeouts, TimeoutError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TimeoutError) or "Timeout" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_transient(error: BaseException) -> bool:
    """Whether an exception from an LM client looks transient; walks the cause chain."""
    seen: BaseException | None = error
    while seen is not None:
        status = getattr(seen, "status_code", None) or getattr(seen, "status", None)
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
        if isinstance(seen, ConnectionError | TimeoutError):
            return True
        if any(name in type(seen).__name__ for name in _TRANSIENT_NAMES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
