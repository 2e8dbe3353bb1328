"""Pure merge and aggregation logic of parallel and ensemble nodes (no Celery, no Redis).

Mergers turn what each parallel member added to the state into one state update. Aggregators
turn the ensemble members' (answer, confidence) votes into one Verdict. Both kinds can be custom:
an import path `module:function` with the same signature as the built-ins.
"""

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["chosen", "no_consensus", "no_votes"]


@dataclass(frozen=True)
class MemberOutcome:
    """One parallel member: the state fields it added or changed, or why it failed."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Vote:
    """One ensemble member's answer and confidence (in [0, 1]), or its error."""

    member: str
    answer: Any = None
    confidence: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Verdict:
    """What an aggregator decided. `answer` is None unless `outcome` is "chosen"."""

    outcome: Outcome
    answer: Any
    confidence: float
    support: list[str] = field(default_factory=list)  # members whose answer won
    tally: dict[str, float] = field(default_factory=dict)
    tie: bool = False

    def report(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "answer": self.answer, "confidence": self.confidence,
                "support": self.support, "tally": self.tally, "tie": self.tie}


Merger = Callable[[dict[str, Any], list[MemberOutcome]], dict[str, Any]]
Aggregator = Callable[[list[Vote], float], Verdict]

# ---- mergers ---------------------------------------------------------------------------------


def merge_fields(base: dict[str, Any], members: list[MemberOutcome]) -> dict[str, Any]:
    """Every successful member's changes, in member order: on a clash the later member wins."""
    merged: dict[str, Any] = {}
    for member in members:
        if member.ok:
            merged.update(member.changes)
    return merged


def conflicts(members: list[MemberOutcome]) -> dict[str, list[str]]:
    """Fields set to different values by several successful members, with those members."""
    writers: dict[str, list[str]] = {}
    values: dict[str, list[Any]] = {}
    for member in (m for m in members if m.ok):
        for name, value in member.changes.items():
            writers.setdefault(name, []).append(member.name)
            values.setdefault(name, []).append(value)
    return {name: who for name, who in writers.items() if len(who) > 1 and _distinct(values[name])}


def _distinct(values: list[Any]) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1


def merge_concat(base: dict[str, Any], members: list[MemberOutcome], field_name: str,
                 separator: str = "\n\n") -> dict[str, Any]:
    """Field-wise merge, except `field_name`: the members' texts joined in member order."""
    merged = merge_fields(base, members)
    texts = [_text(m.changes[field_name]) for m in members if m.ok and field_name in m.changes]
    if texts:
        merged[field_name] = separator.join(texts)
    return merged


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(item) for item in value)
    return str(value)


# ---- aggregators -----------------------------------------------------------------------------

_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`()[]{}"


def normalise_answer(answer: Any) -> str:
    """The key answers are counted under: case, inner spacing and edge punctuation do not matter."""
    if not isinstance(answer, str):
        return json.dumps(answer, sort_keys=True, default=str)
    return re.sub(r"\s+", " ", answer.casefold()).strip(_EDGE_PUNCTUATION)


def clamp_confidence(value: Any) -> float:
    """A member's confidence as a float in [0, 1]; raises ValueError naming a non-number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"confidence must be a number in [0, 1], got {value!r}")
    return min(1.0, max(0.0, float(value)))


@dataclass
class _Group:
    """The votes for one normalised answer."""

    key: str
    votes: list[Vote] = field(default_factory=list)
    first: int = 0

    @property
    def weight(self) -> float:
        return sum(v.confidence for v in self.votes)

    @property
    def best(self) -> Vote:
        return max(self.votes, key=lambda v: v.confidence)


def _groups(votes: list[Vote]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for index, vote in enumerate(votes):
        if vote.ok:
            key = normalise_answer(vote.answer)
            groups.setdefault(key, _Group(key, first=index)).votes.append(vote)
    return list(groups.values())


def _chosen(group: _Group, confidence: float, tally: dict[str, float], tie: bool) -> Verdict:
    """The verdict for a winning group; the answer is the form its most confident member gave."""
    support = [v.member for v in group.votes]
    return Verdict("chosen", group.best.answer, round(confidence, 4), support, tally, tie)


def no_votes() -> Verdict:
    return Verdict("no_votes", None, 0.0)


def weighted_voting(votes: list[Vote], threshold: float = 0.5) -> Verdict:
    """Votes weighted by confidence; confidence of the result = its share of the total weight.

    A tie on weight is broken by more votes, then the most confident single vote, then the
    earliest member; `tie` records that one happened. When every confidence is 0, votes count 1.
    """
    groups = _groups(votes)
    if not groups:
        return no_votes()
    total = sum(g.weight for g in groups)
    weigh: Callable[[_Group], float] = (lambda g: g.weight) if total > 0 else (lambda g: float(len(g.votes)))
    total = total if total > 0 else float(sum(len(g.votes) for g in groups))
    ranked = sorted(groups, key=lambda g: (-round(weigh(g), 9), -len(g.votes), -g.best.confidence, g.first))
    tally = {g.key: round(weigh(g), 4) for g in ranked}
    tie = len(ranked) > 1 and round(weigh(ranked[0]), 9) == round(weigh(ranked[1]), 9)
    return _chosen(ranked[0], weigh(ranked[0]) / total, tally, tie)


def best_confidence(votes: list[Vote], threshold: float = 0.5) -> Verdict:
    """The single most confident answer (the earliest member on a tie), with its own confidence."""
    ok = [v for v in votes if v.ok]
    if not ok:
        return no_votes()
    top = max(v.confidence for v in ok)
    best = next(v for v in ok if v.confidence == top)
    tally = {normalise_answer(v.answer): v.confidence for v in reversed(ok)}
    tie = any(v.confidence == top and normalise_answer(v.answer) != normalise_answer(best.answer) for v in ok)
    return Verdict("chosen", best.answer, round(best.confidence, 4), [best.member], tally, tie)


def consensus(votes: list[Vote], threshold: float = 0.5) -> Verdict:
    """An answer given by at least `threshold` of ALL members (failed ones do not agree).

    Below the threshold, or when two answers share the top count, the outcome is "no_consensus"
    with no answer: never an arbitrary pick. Confidence = the agreeing share of members.
    """
    groups = _groups(votes)
    if not groups:
        return no_votes()
    ranked = sorted(groups, key=lambda g: (-len(g.votes), g.first))
    tally = {g.key: round(len(g.votes) / len(votes), 4) for g in ranked}
    share = len(ranked[0].votes) / len(votes)
    tie = len(ranked) > 1 and len(ranked[0].votes) == len(ranked[1].votes)
    if tie or share < threshold:
        return Verdict("no_consensus", None, round(share, 4), [], tally, tie)
    return _chosen(ranked[0], share, tally, False)


AGGREGATORS: dict[str, Aggregator] = {
    "weighted_voting": weighted_voting,
    "best_confidence": best_confidence,
    "consensus": consensus,
}


def load_callable(path: str, what: str) -> Callable[..., Any]:
    """A function from `module:name`; a clear error naming the path when it cannot be loaded."""
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot load {what} '{path}': {error}") from None
    if not callable(target):
        raise ValueError(f"{what} '{path}' is not callable")
    return target  # type: ignore[no-any-return]


def aggregator(name: str) -> Aggregator:
    return AGGREGATORS.get(name) or load_callable(name, "aggregator")


def aggregate(name: str, votes: list[Vote], threshold: float) -> Verdict:
    """Run a built-in or custom aggregator; a custom one may return a Verdict or a dict of its fields."""
    verdict = aggregator(name)(votes, threshold)
    if isinstance(verdict, dict):
        verdict = Verdict(**verdict)
    if not isinstance(verdict, Verdict):
        raise ValueError(f"aggregator '{name}' returned {type(verdict).__name__}, not a Verdict")
    return verdict


def merger(name: str, concat_field: str | None = None, separator: str = "\n\n") -> Merger:
    if name == "fields":
        return merge_fields
    if name == "concat":
        return lambda base, members: merge_concat(base, members, concat_field or "", separator)
    return load_callable(name, "merger")
