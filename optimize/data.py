"""Training and development sets for `stagecoach optimize`, and the metrics it scores them with.

A set is a JSON-lines file. HotPotQA records (`_id`, `supporting_facts`, `context`, ...) become
`{id, question, answer, supporting_titles}` (monitor.evaluation reads them); any other line is used as
it is. Every line must hold the pipeline's input fields; the other fields are labels. `exact` and `f1`
score the pipeline's answer field against the gold field (`answer` by default) the way the HotPotQA
script does; `MODULE:FN` names any DSPy metric `fn(example, prediction, trace=None)`.
"""

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy

from contracts.jsonlines import object_line
from monitor.evaluation import exact_match, token_f1

Metric = Callable[..., Any]
BUILTIN_METRICS = ("exact", "f1")


class DataError(ValueError):
    """A training or development file (or a metric) is unusable; the message names the file, line and field."""


def load_set(path: Path, inputs: list[str], limit: int | None = None) -> list[dspy.Example]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples: list[dspy.Example] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = _record(path, number, line)
        missing = [name for name in inputs if name not in record]
        if missing:
            raise DataError(f"{path}:{number}: missing input field(s) {', '.join(missing)} of the pipeline")
        examples.append(dspy.Example(**record).with_inputs(*inputs))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _record(path: Path, number: int, line: str) -> dict[str, Any]:
    record = object_line(path, number, line, DataError)
    if "supporting_facts" in record or "_id" in record:  # a HotPotQA record: its question, answer and titles
        titles = list(dict.fromkeys(str(fact[0]) for fact in record.get("supporting_facts") or []))
        return {"id": str(record.get("_id") or number), "question": record.get("question"),
                "answer": record.get("answer"), "supporting_titles": titles}
    return record


def answer_field(outputs: list[str], example: dspy.Example, gold: str) -> str:
    """The pipeline output a built-in metric reads: one named like the gold field, else one named like
    another label of the data, else `final_answer`/`answer`, else the last declared output."""
    for name in [gold, *map(str, example.labels().keys())]:
        if name in outputs:
            return name
    for name in ("final_answer", "answer"):
        if name in outputs:
            return name
    if not outputs:
        raise DataError("the pipeline declares no outputs to score")
    return outputs[-1]


def make_metric(name: str, field: str, gold: str) -> Metric:
    """`exact`, `f1`, or a `module:function` DSPy metric."""
    if name == "exact":
        return QAMetric(exact_match, field, gold)
    if name == "f1":
        return QAMetric(token_f1, field, gold)
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise DataError(f"--metric '{name}': use exact, f1 or an import path module:function")
    if os.getcwd() not in sys.path:  # as `python -m` would: a metric module of the project run from
        sys.path.append(os.getcwd())
    try:
        metric: Metric = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise DataError(f"--metric '{name}': cannot import it ({error})") from None
    return metric


class QAMetric:
    """A HotPotQA-script score of one prediction field against one gold field, as a DSPy metric."""

    def __init__(self, score: Callable[[str, str], float], field: str, gold: str) -> None:
        self.score = score
        self.field = field
        self.gold = gold
        self.__name__ = f"{score.__name__}({field} vs {gold})"

    def __call__(self, example: dspy.Example, prediction: Any, trace: Any = None) -> float:
        if self.gold not in example:
            raise DataError(f"example has no gold field '{self.gold}' (set --gold-field)")
        predicted = getattr(prediction, self.field, None)
        return self.score("" if predicted is None else str(predicted), str(example[self.gold]))
