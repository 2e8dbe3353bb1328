"""JSON Lines files of examples (devsets, training sets): one JSON object a line, errors naming the line."""

import json
from pathlib import Path
from typing import Any


def object_line(path: Path, number: int, line: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """Line `number` of `path` as a JSON object; `error` (naming the file and line) when it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as problem:
        raise error(f"{path}:{number}: not JSON ({problem.msg})") from None
    if not isinstance(record, dict):
        raise error(f"{path}:{number}: each line must be a JSON object")
    return record
