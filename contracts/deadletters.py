"""Dead letters: messages no worker could run, kept with the reason and (bounded) raw bytes."""

import base64
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Source = Literal["broker", "task"]


class DeadLetter(BaseModel):
    """One quarantined message. `raw_b64` holds at most the first `max_raw_bytes` of it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    at: float = Field(default_factory=time.time)
    queue: str = ""
    reason: str
    task: str | None = Field(None, description="task name the message named, if any")
    task_id: str | None = Field(None, description="task id the message named, if any")
    root_id: str | None = Field(None, description="the job the message belonged to, if named")
    size: int = Field(0, description="bytes of the whole raw message")
    truncated: bool = False
    raw_b64: str = ""
    source: Source = Field(
        "broker", description="broker: raw bytes of a broker message (replayable); task: the arguments a task refused")

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_b64)

    @classmethod
    def of(cls, reason: str, raw: bytes, queue: str, limit: int, named: dict[str, str] | None = None,
           source: Source = "broker") -> "DeadLetter":
        """An entry keeping the first `limit` raw bytes; `named`: task, task_id, root_id when known."""
        names = {k: v for k, v in (named or {}).items() if k in ("task", "task_id", "root_id") and v}
        return cls(reason=reason, queue=queue, size=len(raw), truncated=len(raw) > limit, source=source,
                   raw_b64=base64.b64encode(raw[:limit]).decode(), **names)
