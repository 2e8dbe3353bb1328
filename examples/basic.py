"""Stages of the two sequential example pipelines (`qa` and `digest`)."""

import dspy


class KeyTerms(dspy.Signature):
    """List the key terms a reader must understand to answer the question."""

    question: str = dspy.InputField()
    key_terms: list[str] = dspy.OutputField(desc="two to four short noun phrases")


class Answer(dspy.Signature):
    """Answer the question in one short sentence, using the key terms. Give a confidence from 0 to 1."""

    question: str = dspy.InputField()
    key_terms: list[str] = dspy.InputField()
    answer: str = dspy.OutputField(desc="one short sentence")
    confidence: float = dspy.OutputField(desc="0 to 1")


class Summarize(dspy.Signature):
    """Summarize the document in at most two sentences."""

    document: str = dspy.InputField()
    summary: str = dspy.OutputField()


class Headline(dspy.Signature):
    """Write a short headline and up to three topic tags for the summary."""

    summary: str = dspy.InputField()
    headline: str = dspy.OutputField(desc="at most ten words")
    tags: list[str] = dspy.OutputField(desc="one-word topics")
