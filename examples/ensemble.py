"""Stages of the parallel and ensemble examples, plus a custom merger and a slow stage for tests.

`Solve` answers a question with a confidence; an optional `persona` input lets members of one
ensemble read different instructions from the state. `Tone` and `Entities` are two of the three
analyses the `parallel_analysis` pipeline merges (the third is `digest`'s `summarize`).
"""

import time
from typing import Any, Literal

import dspy
from celery.exceptions import SoftTimeLimitExceeded

from routing.aggregate import MemberOutcome


class Solve(dspy.Signature):
    """Answer the question in a few words, in the given persona if any. Give a confidence from 0 to 1."""

    question: str = dspy.InputField()
    persona: str = dspy.InputField(desc="how to approach the question; may be empty")
    answer: str = dspy.OutputField(desc="a few words")
    confidence: float = dspy.OutputField(desc="0 to 1")


class Tone(dspy.Signature):
    """Classify the overall tone of the document."""

    document: str = dspy.InputField()
    tone: Literal["positive", "neutral", "negative"] = dspy.OutputField()


class Entities(dspy.Signature):
    """List the named entities (places, people, organisations) in the document."""

    document: str = dspy.InputField()
    entities: list[str] = dspy.OutputField(desc="at most five names")


class Probe(dspy.Signature):
    """Report one finding about the text and how salient it is from 0 to 1."""

    text: str = dspy.InputField()
    finding: str = dspy.OutputField()
    score: float = dspy.OutputField(desc="0 to 1")


class Sleeper(dspy.Module):
    """Sleeps instead of calling an LM, to test time limits without an LM in the way.

    With `stubborn`, it ignores Celery's soft time limit, like a call stuck in native code, so
    only the hard limit (killing the worker process) stops it.
    """

    def __init__(self, seconds: float = 30.0, stubborn: bool = False) -> None:
        super().__init__()
        self.seconds = seconds
        self.stubborn = stubborn

    def forward(self, text: str) -> dspy.Prediction:
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            try:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            except SoftTimeLimitExceeded:
                if not self.stubborn:
                    raise
        return dspy.Prediction(finding=f"slept {self.seconds}s on <{text}>", score=0.0)


def ranked_findings(base: dict[str, Any], members: list[MemberOutcome]) -> dict[str, Any]:
    """A custom merger: every successful member's `finding`, most salient (`score`) first."""
    found = [m.changes for m in members if m.ok and "finding" in m.changes]
    found.sort(key=lambda changes: -float(changes.get("score") or 0.0))
    return {"findings": [changes["finding"] for changes in found]}
