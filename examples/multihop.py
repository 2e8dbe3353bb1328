"""Multi-hop question answering: decompose, retrieve per sub-question, synthesize.

Each stage is a `dspy.Module` a Stagecoach worker can load (`examples.multihop:DecomposeStage`...),
and `MultiHopQA` composes the very same modules in-process, the plain-DSPy way. With a
deterministic LM both give identical outputs: distribution changes where a stage runs, not what it
computes. HotPotQA scoring (answer normalisation, exact match, token F1, title recall) lives here
too, so the evaluation command and tests share one definition.
"""

import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
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
    """The whole pipeline in one process (the seed's `build_multi_hop_qa_pipeline`)."""

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


# --- HotPotQA data and scoring (the official evaluation script's normalisation) ---


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answer: str
    supporting_titles: list[str] = field(default_factory=list)


def load_examples(path: Path, limit: int | None = None) -> list[QAExample]:
    """HotPotQA records (`_id`, `supporting_facts`) or simple ones (`id`, `supporting_titles`)."""
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            examples.append(_example(path, number, _json_line(path, number, line)))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _json_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: each line must be a JSON object")
    return record


def _example(path: Path, number: int, record: dict[str, Any]) -> QAExample:
    if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
        raise ValueError(f"{path}:{number}: a question record needs string fields 'question' and 'answer'")
    titles = record.get("supporting_titles")
    if titles is None:
        titles = list(dict.fromkeys(str(fact[0]) for fact in record.get("supporting_facts") or []))
    ident = str(record.get("_id") or record.get("id") or number)
    return QAExample(ident, record["question"], record["answer"], [str(t) for t in titles])


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, articles and extra whitespace (HotPotQA / SQuAD)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token F1 as HotPotQA scores it: yes/no/noanswer must match exactly."""
    pred, truth = normalize_answer(prediction), normalize_answer(gold)
    special = {"yes", "no", "noanswer"}
    if (pred in special or truth in special) and pred != truth:
        return 0.0
    common = Counter(pred.split()) & Counter(truth.split())
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred.split()), same / len(truth.split())
    return 2 * precision * recall / (precision + recall)


def title_recall(retrieved: list[list[str]] | list[str], gold: list[str]) -> float:
    """Share of the gold supporting titles found among all passages retrieved for the question."""
    if not gold:
        return 1.0
    flat = {t for item in retrieved for t in ([item] if isinstance(item, str) else item)}
    return sum(title in flat for title in gold) / len(gold)


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
