"""Helpers shared by the node kinds decided at run time: reading the state field a decision is
made on, and normalising a router's choice."""

import re
from typing import Any

from contracts.envelope import Envelope
from routing.errors import RoutingError

_SEPARATORS = re.compile(r"[\s\-]+")


def normalise_choice(value: Any) -> str:
    """`" Short Answer "`, `short-answer` and `SHORT_ANSWER` all become `short_answer`."""
    return _SEPARATORS.sub("_", str(value).strip().lower())


def state_value(job: Envelope, field: str, where: str) -> Any:
    """A state field a runtime node decides on; a clear RoutingError when it is absent."""
    if field not in job.state:
        known = ", ".join(sorted(job.state)) or "none"
        raise RoutingError(f"{where}: state field '{field}' is missing; state has: {known}", job.job_id)
    return job.state[field]
