"""DSPy modules of the benchmark-only stages."""

import hashlib

import dspy


class Polish(dspy.Signature):
    """Rewrite the answer in plain words."""

    answer: str = dspy.InputField()
    polished: str = dspy.OutputField(desc="one short sentence")


class CpuScore(dspy.Module):
    """A stand-in for parsing or retrieval: `rounds` sha256 steps over the document, no LM call."""

    def __init__(self, rounds: int = 6000) -> None:
        super().__init__()
        self.rounds = rounds

    def forward(self, document: str) -> dspy.Prediction:
        digest = document.encode()
        for _ in range(self.rounds):
            digest = hashlib.sha256(digest * 8).digest()
        return dspy.Prediction(score=digest[0])


class QuickAnswer(dspy.Signature):
    """Answer the question in a few words, using the evidence."""

    question: str = dspy.InputField()
    evidence: str = dspy.InputField()
    answer: str = dspy.OutputField()


class CpuAnswer(dspy.Module):
    """An optimisable stage whose calls are CPU-bound: `rounds` sha256 steps over the question (a stand-in
    for parsing or retrieval), then one LM call that a DSPy optimiser can tune."""

    def __init__(self, rounds: int = 240000) -> None:
        super().__init__()
        self.rounds = rounds
        self.answer = dspy.Predict(QuickAnswer)

    def forward(self, question: str) -> dspy.Prediction:
        digest = question.encode()
        for _ in range(self.rounds):
            digest = hashlib.sha256(digest * 8).digest()
        return self.answer(question=question, evidence=digest.hex()[:16])
