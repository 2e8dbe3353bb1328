"""Question-answering evaluation: HotPotQA-style question files and the official scoring.

Answer normalisation, exact match and token F1 follow the HotPotQA / SQuAD evaluation script;
title recall scores retrieval against the gold supporting titles. `stagecoach eval`, the examples
and the tests share these one definitions.
"""

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.jsonlines import object_line


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
            examples.append(_example(path, number, object_line(path, number, line)))
        if limit is not None and len(examples) >= limit:
            break
    return examples



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
