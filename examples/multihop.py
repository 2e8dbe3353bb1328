"""Multi-hop question answering: decompose, retrieve per sub-question, synthesize.

Each stage is a `dspy.Module` a Stagecoach worker can load (`examples.multihop:DecomposeStage`...),
and `MultiHopQA` composes the very same modules in-process, the plain-DSPy way. With a
deterministic LM both give identical outputs: distribution changes where a stage runs, not what it
computes. HotPotQA data and scoring live in `monitor.evaluation`, shared with `stagecoach eval`.
"""

from typing import Any

import dspy

from examples.retrieval import CorpusFormat, Passage, Retriever, open_retriever

DEFAULT_K = 3


class Decompose(dspy.Signature):
    """Break a multi-hop question into simpler sub-questions, each answerable from a single passage.

    Later sub-questions may name the answer of an earlier one in general terms."""

    question: str = dspy.InputField()
    sub_questions: list[str] = dspy.OutputField(desc="two to four short, self-contained questions")


class ExtractInfo(dspy.Signature):
    """Answer the sub-question from the passages, stating the facts that support the answer."""

    sub_question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="retrieved passages, each 'Title: text'")
    retrieved_info: str = dspy.OutputField(desc="one or two sentences of facts taken from the passages")


class Synthesize(dspy.Signature):
    """Answer the original question from the retrieved facts with a short answer: a name, a date, a number,
    or yes/no."""

    original_question: str = dspy.InputField()
    retrieved_facts: list[str] = dspy.InputField()
    final_answer: str = dspy.OutputField(desc="a few words, no full sentence")


class DecomposeStage(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decompose = dspy.ChainOfThought(Decompose)

    def forward(self, question: str) -> dspy.Prediction:
        return self.decompose(question=question)


class RetrieveStage(dspy.Module):
    """BM25 top-k passages for the sub-question, then a chain-of-thought step extracting the facts.

    Also returns the titles of the passages it read, so an evaluation can score retrieval."""

    def __init__(
        self,
        corpus: str,
        k: int = DEFAULT_K,
        format: CorpusFormat = "jsonl",
        corpus_env: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"retrieve option 'k' must be at least 1 (got {k})")
        self.k = k
        self.retriever: Retriever = open_retriever(corpus, format, corpus_env, cache_dir)
        self.extract = dspy.ChainOfThought(ExtractInfo)

    def forward(self, sub_question: str) -> dspy.Prediction:
        found: list[Passage] = self.retriever.search(sub_question, self.k)
        passages = [p.render() for p in found] or ["(no passage matched)"]
        pred = self.extract(sub_question=sub_question, passages=passages)
        return dspy.Prediction(
            reasoning=pred.reasoning, retrieved_info=pred.retrieved_info, titles=[p.title for p in found]
        )


class SynthesizeStage(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.synthesize = dspy.ChainOfThought(Synthesize)

    def forward(self, original_question: str, retrieved_facts: list[str]) -> dspy.Prediction:
        return self.synthesize(original_question=original_question, retrieved_facts=retrieved_facts)


class MultiHopQA(dspy.Module):
    """The whole pipeline in one process (plain DSPy, composed in-process)."""

    def __init__(self, decompose: DecomposeStage, retrieve: RetrieveStage, synthesize: SynthesizeStage) -> None:
        super().__init__()
        self.decompose = decompose
        self.retrieve = retrieve
        self.synthesize = synthesize

    def forward(self, question: str) -> dspy.Prediction:
        sub_questions = list(self.decompose(question=question).sub_questions)
        hops = [self.retrieve(sub_question=sub) for sub in sub_questions]
        facts = [hop.retrieved_info for hop in hops]
        answer = self.synthesize(original_question=question, retrieved_facts=facts)
        return dspy.Prediction(
            question=question,
            sub_questions=sub_questions,
            retrieved_facts=facts,
            retrieved_titles=[list(hop.titles) for hop in hops],
            final_answer=answer.final_answer,
        )


def build_multi_hop_qa_pipeline(corpus: str, k: int = DEFAULT_K, format: CorpusFormat = "jsonl",
                                corpus_env: str | None = None, decompose_state: str | None = None) -> MultiHopQA:
    """The in-process program, optionally with a compiled decompose stage loaded from saved state."""
    decompose = DecomposeStage()
    if decompose_state:
        decompose.load(decompose_state)
    return MultiHopQA(decompose, RetrieveStage(corpus, k, format, corpus_env), SynthesizeStage())


# --- Optimisation: compile one stage in-process, save its state for workers to load ---


def decomposes(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> bool:
    """Metric for bootstrapping decompose demos: at least two distinct, non-empty sub-questions."""
    subs = [s.strip() for s in getattr(prediction, "sub_questions", None) or [] if isinstance(s, str)]
    return len(set(subs)) >= 2 and all(subs)


def optimise_decompose(questions: list[str], max_demos: int = 2) -> DecomposeStage:
    """`dspy.BootstrapFewShot` on the decompose stage, under the caller's `dspy.context` LM.

    Save the result with `.save("decompose.json")` and name it as a stage's `state`."""
    trainset = [dspy.Example(question=q).with_inputs("question") for q in questions]
    optimiser = dspy.BootstrapFewShot(metric=decomposes, max_bootstrapped_demos=max_demos, max_labeled_demos=0)
    compiled: DecomposeStage = optimiser.compile(DecomposeStage(), trainset=trainset)
    return compiled
