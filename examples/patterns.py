"""Stages of the pattern examples (branch, loop, map, sub-pipeline, adaptive); see docs/patterns.md."""

import time
from typing import Literal

import dspy
from celery.exceptions import SoftTimeLimitExceeded


class Define(dspy.Signature):
    """Define the term in one sentence."""

    term: str = dspy.InputField()
    definition: str = dspy.OutputField(desc="one sentence")


class ClassifyTask(dspy.Signature):
    """Classify which kind of answer the question asks for."""

    question: str = dspy.InputField()
    task_type: Literal["multiple_choice", "short_answer", "essay"] = dspy.OutputField()


class ShortAnswer(dspy.Signature):
    """Answer the question in one short sentence."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="one short sentence")


class Essay(dspy.Signature):
    """Answer the question as a short essay: a claim, two supporting points and a conclusion."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few paragraphs")


class Refine(dspy.Signature):
    """Improve the draft: make it clearer, more complete and more precise."""

    draft: str = dspy.InputField()
    draft_next: str = dspy.OutputField(desc="the improved draft")


class ScoreDraft(dspy.Module):
    """A deterministic quality score without an LM: longer drafts score higher, up to 1.0.

    Stands in for a metric (or an LM judge) in the iterative-refinement example, so the stopping
    conditions can be seen at work: the score rises while the draft grows, then plateaus.
    """

    def __init__(self, full_length: int = 100) -> None:
        super().__init__()
        self.full_length = full_length

    def forward(self, draft: str) -> dspy.Prediction:
        return dspy.Prediction(quality=round(min(len(draft), self.full_length) / self.full_length, 3))


class Stall(dspy.Module):
    """A time-limit fixture without an LM: a text containing `[[stall]]` blocks past Celery's soft
    limit (like a call stuck in native code), so only the hard limit stops it; others echo at once."""

    def __init__(self, seconds: float = 30.0) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, text: str) -> dspy.Prediction:
        deadline = time.monotonic() + (self.seconds if "[[stall]]" in text else 0.0)
        while time.monotonic() < deadline:
            try:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            except SoftTimeLimitExceeded:
                continue
        return dspy.Prediction(echo=f"echo of <{text}>")
