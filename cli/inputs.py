"""Job inputs from the command line (`--input k=v`) and from JSON-lines files."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.fields import Fields

MAX_DEPTH = 64  # deeper JSON is refused: pydantic, kombu and Redis round trips recurse on it


class InputError(ValueError):
    """Input the CLI cannot turn into a job request; the message names the flag, line or field."""


@dataclass(frozen=True)
class Line:
    number: int
    inputs: dict[str, Any] | None
    problem: str | None = None


def parse_pairs(pairs: list[str], fields: Fields) -> dict[str, Any]:
    """`k=v` pairs to inputs: a value is JSON when it parses, else text; a `str` field keeps the raw text."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise InputError(f"--input {pair!r}: expected NAME=VALUE")
        if name in inputs:
            raise InputError(f"--input {name}: given twice")
        inputs[name] = parse_value(raw, fields[name].type if name in fields else None)
    return inputs


def parse_value(raw: str, type_name: str | None) -> Any:
    if type_name is not None and type_name.replace(" ", "") in ("str", "str?"):
        return raw  # `--input question=42` means the text "42"
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InputError(f"--input value nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError:
        return raw
    if depth(value) > MAX_DEPTH:
        raise InputError(f"--input value nested too deeply (more than {MAX_DEPTH} levels)")
    return value


def read_lines(path: Path) -> Iterator[Line]:
    """Each non-blank line of a JSON-lines file: an inputs object, or the problem that line has."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"--input-file {path}: {error.strerror or error}") from None
    for number, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            yield parse_line(number, raw)


def parse_line(number: int, raw: bytes | str) -> Line:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as error:
        return Line(number, None, f"not UTF-8 text (byte {error.start + 1}: {error.reason})")
    try:
        value = json.loads(text)
    except RecursionError:
        return Line(number, None, f"JSON nested too deeply (more than {MAX_DEPTH} levels)")
    except ValueError as error:
        return Line(number, None, f"not JSON ({error})")
    if not isinstance(value, dict):
        return Line(number, None, f"expected a JSON object of inputs, got {type(value).__name__}")
    if depth(value) > MAX_DEPTH:
        return Line(number, None, f"JSON nested too deeply (more than {MAX_DEPTH} levels)")
    return Line(number, value)


def depth(value: Any, limit: int = MAX_DEPTH + 1) -> int:
    """Nesting depth of JSON data, counted up to `limit` (iterative: deep input must not recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
