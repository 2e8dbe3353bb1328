"""Errors raised while loading or checking contracts. All are permanent: retrying cannot fix them."""

from dataclasses import dataclass


class StagecoachError(Exception):
    """Root of every error Stagecoach raises on purpose. Its message is always encodable text: a lone
    surrogate from the input it names is shown escaped (`\\ud800`), so printing, logging or storing
    the error never fails in turn."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(encodable(arg) if isinstance(arg, str) else arg for arg in args))


class ContractError(StagecoachError):
    """Data does not match a declared contract; carries one problem per offending field."""

    def __init__(self, where: str, problems: list["FieldProblem"]) -> None:
        self.where = where
        self.problems = problems
        detail = "; ".join(str(p) for p in problems)
        super().__init__(f"{where}: {detail}")


def encodable(text: str) -> str:
    """The text with every code point UTF-8 cannot encode (a lone surrogate) written as `\\udXXX`."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class FieldProblem:
    field: str
    problem: str

    def __str__(self) -> str:
        return f"field '{self.field}': {self.problem}"


class SpecError(StagecoachError):
    """A stage or pipeline definition is invalid (unknown stage, cycle, bad type name...)."""


class UnknownPipelineError(SpecError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown pipeline '{name}'; known pipelines: {', '.join(sorted(known)) or 'none'}")


class UnknownStageError(SpecError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"unknown stage '{name}'; known stages: {', '.join(sorted(known)) or 'none'}")


class UnknownVersionError(SpecError):
    """A stage or pipeline exists, but not in the version asked for."""

    def __init__(self, what: str, name: str, version: str, known: list[str]) -> None:
        self.name = name
        self.version = version
        self.known = known
        super().__init__(f"unknown version '{version}' of {what} '{name}'; known versions: {', '.join(known)}")
