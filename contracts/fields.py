"""Field declarations of stage and pipeline contracts, and the pydantic models built from them.

A contract is written as data (`question: str`, `sub_questions: list[str]`), so pipelines can be
defined in YAML and validated by any process without importing the stage's code.
"""

from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic_core import to_json

from contracts.errors import ContractError, FieldProblem, SpecError, encodable

_SCALARS: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "any": Any, "dict": dict[str, Any]}


def parse_type(name: str) -> Any:
    """Turn a type name (`str`, `list[str]`, `enum[a,b]`, `int?`) into a Python annotation."""
    text = name.replace(" ", "")
    if text.endswith("?"):
        return parse_type(text[:-1]) | None
    if text in _SCALARS:
        return _SCALARS[text]
    if text.startswith("list[") and text.endswith("]"):
        return list[parse_type(text[5:-1])]  # type: ignore[misc]
    if text.startswith("enum[") and text.endswith("]"):
        values = tuple(v for v in text[5:-1].split(",") if v)
        if values:
            return Literal[values]
    raise SpecError(f"unknown field type '{name}'; use str, int, float, bool, dict, any, list[T], enum[a,b], T?")


class FieldSpec(BaseModel):
    """One declared field: its type name, an optional description and an optional default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = "str"
    description: str = ""
    default: Any = None
    required: bool = True

    @model_validator(mode="before")
    @classmethod
    def _from_type_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _type_is_known(self) -> "FieldSpec":
        parse_type(self.type)
        return self

    def annotation(self) -> Any:
        return parse_type(self.type)


Fields = dict[str, FieldSpec]


def build_model(name: str, fields: Fields) -> type[BaseModel]:
    """A strict pydantic model for a contract: unknown fields are rejected, types are checked."""
    return _cached_model(name, tuple(sorted((k, v.model_dump_json()) for k, v in fields.items())))


@lru_cache(maxsize=512)
def _cached_model(name: str, frozen_fields: tuple[tuple[str, str], ...]) -> type[BaseModel]:
    definitions: dict[str, Any] = {}
    for field_name, raw in frozen_fields:
        spec = FieldSpec.model_validate_json(raw)
        default = ... if spec.required and spec.default is None else spec.default
        definitions[field_name] = (spec.annotation(), Field(default, description=spec.description))
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        name, __config__=ConfigDict(extra="forbid"), **definitions
    )
    return model


Location = tuple[str | int, ...]
UNENCODABLE = "unencodable"  # pydantic error type of a string UTF-8 cannot encode (see unencodable())


def unencodable(data: Any) -> list[tuple[Location, str]]:
    """Where data (a str, or dicts and lists of them, keys included) holds a lone surrogate, and what.

    Such text (`json.loads('"\\ud800"')`, or bytes a program decoded with surrogateescape) cannot be
    encoded as UTF-8: no JSON dump, Redis write, log line or terminal takes it, so it is refused at
    the door like any other contract violation. Iterative: deep input must not recurse.
    """
    found: list[tuple[Location, str]] = []
    stack: list[tuple[Location, Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            problem = _surrogate(value)
            if problem:
                found.append((loc, problem))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                problem = _surrogate(key) if isinstance(key, str) else None
                if problem:
                    found.append(((*loc, key), f"key {problem}"))
                stack.append(((*loc, key), item))
        elif isinstance(value, list | tuple):
            stack.extend(((*loc, index), item) for index, item in reversed(list(enumerate(value))))
    return found


def utf8_json(data: Any) -> bool:
    """Whether data serialises to UTF-8 JSON as it is: the common case, told apart by pydantic-core's
    serialiser (Rust) at a fraction of a walk's cost; only the rest is walked by `unencodable`."""
    try:
        to_json(data)
    except (ValueError, RecursionError):  # a lone surrogate, an object it does not know, too deep
        return False
    return True


def _surrogate(text: str) -> str | None:
    """What is wrong with text UTF-8 cannot encode, naming the first bad code point and its index."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = encodable(text[error.start])
        return f"contains a lone surrogate ({bad} at position {error.start}): not encodable as UTF-8"
    return None


def field_path(loc: Location) -> str:
    """A location as a dotted field path (`hops.2.question`), printable whatever the keys hold."""
    return encodable(".".join(str(part) for part in loc)) or "<input>"


def unencodable_problems(data: Any) -> list[FieldProblem]:
    return [FieldProblem(field_path(loc), problem) for loc, problem in unencodable(data)]


def problems_of(error: ValidationError, skip: list[FieldProblem] | None = None) -> list[FieldProblem]:
    """One readable problem per field from a pydantic error (field name, what is wrong, what came).
    With `skip` (the unencodable text found): no second problem for those fields, nor pydantic's own
    complaint about that text (`string_unicode`)."""
    named = {p.field for p in skip or []}
    problems = []
    for item in error.errors():
        field = field_path(item["loc"])
        if skip and (field in named or item["type"] == "string_unicode"):
            continue
        message = _describe(item)
        problems.append(FieldProblem(field, message))
    return problems


def _describe(item: Any) -> str:
    kind = item["type"]
    if kind == UNENCODABLE:
        return str(item["msg"])
    if kind == "missing":
        return "missing required field"
    if kind == "extra_forbidden":
        return "unexpected field (not in the contract)"
    given = repr(item.get("input"))
    if len(given) > 80:
        given = given[:77] + "..."
    return f"{item['msg'].lower()} (got {given})"


def validate(where: str, fields: Fields, data: dict[str, Any]) -> dict[str, Any]:
    """Validate data against a contract; return it coerced to plain JSON, or raise ContractError."""
    model = build_model(_model_name(where), fields)
    plain = utf8_json(data)
    problems = [] if plain else unencodable_problems(data)
    try:
        clean = model.model_validate(data).model_dump(mode="json")
    except ValidationError as error:
        raise ContractError(where, problems + problems_of(error, skip=problems)) from None
    if not plain:
        problems = problems or unencodable_problems(clean)  # the coerced data: text inside objects too
    if problems:
        raise ContractError(where, problems)
    return clean


def _model_name(where: str) -> str:
    return "".join(part.capitalize() for part in where.replace(".", " ").replace("-", " ").split()) or "Contract"
