"""Adaptive: analyse the input text and run one of several named structures.

The analysis is cheap and deterministic (no LM): length in characters and words, a complexity
score in [0, 1] from length, reasoning vocabulary and clause count, and a type:
`complex_reasoning` (complexity at or above the node's threshold), `question` (ends with `?` or
opens with a question word) or `statement`. The structure is `rules[type]`, else the structure
named like the type, else `default`; none of those is a RoutingError naming the type and the
structures. The analysis and the choice go to the trail and `outputs[<path>]`.
"""

import re
from typing import Any

from celery import Task

from contracts.envelope import Decision, Envelope
from contracts.specs import AdaptiveNode
from routing.compile import Compiler, bind_input
from routing.errors import RoutingError
from routing.kinds import NodeKind
from routing.nodes.runtime import state_value

REASONING_TERMS = frozenset({
    "why", "how", "explain", "compare", "contrast", "analyse", "analyze", "evaluate", "prove", "derive",
    "justify", "reason", "cause", "causes", "because", "therefore", "implication", "implications", "tradeoff",
    "tradeoffs", "consequence", "consequences", "relationship", "impact",
})
QUESTION_OPENERS = frozenset({
    "what", "who", "whom", "whose", "when", "where", "which", "why", "how", "is", "are", "was", "were", "do",
    "does", "did", "can", "could", "should", "would", "will", "may", "might",
})
CONNECTIVES = frozenset({"and", "but", "or", "because", "while", "although", "if", "whereas", "so"})
_WORD = re.compile(r"[a-z0-9'\-]+")
FULL_LENGTH_WORDS = 60


def analyse(text: str, threshold: float = 0.5) -> dict[str, Any]:
    """Length, complexity score and type of an input text."""
    words = _WORD.findall(text.lower())
    reasoning = sum(1 for word in words if word in REASONING_TERMS)
    clauses = 1 + sum(text.count(mark) for mark in ",;:") + sum(1 for word in words if word in CONNECTIVES)
    # length weighs 0.4, reasoning vocabulary up to 0.45, extra clauses up to 0.15
    length_part = 0.4 * min(len(words) / FULL_LENGTH_WORDS, 1.0)
    complexity = round(min(1.0, length_part + 0.15 * min(reasoning, 3) + 0.05 * min(clauses - 1, 3)), 3)
    return {
        "length": len(text),
        "words": len(words),
        "reasoning_terms": reasoning,
        "clauses": clauses,
        "complexity": complexity,
        "type": _kind(text, words, complexity, threshold),
    }


def _kind(text: str, words: list[str], complexity: float, threshold: float) -> str:
    if complexity >= threshold:
        return "complex_reasoning"
    if text.rstrip().endswith("?") or (words and words[0] in QUESTION_OPENERS):
        return "question"
    return "statement"


def choose(node: AdaptiveNode, kind: str, where: str) -> str:
    if kind in node.rules:
        return node.rules[kind]
    if kind in node.structures:
        return kind
    if node.default is not None:
        return node.default
    known = ", ".join(sorted(node.structures))
    raise RoutingError(f"{where}: no structure for input type '{kind}' and no default; structures: {known}")


def decide(task: Task, compiler: Compiler, job: Envelope, raw: dict[str, Any], path: str) -> Any:
    node = AdaptiveNode.model_validate(raw)
    where = f"adaptive '{path}'"
    text = state_value(job, node.text_field, where)
    analysis = analyse(str(text), node.complexity_threshold)
    name = choose(node, analysis["type"], where)
    chosen = job.with_decision(Decision(node=path, kind="adaptive", choice=name, detail=analysis))
    chosen = chosen.model_copy(update={"outputs": {**chosen.outputs, path: {"structure": name, **analysis}}})
    canvas = compiler.node(node.structures[name], f"{path}/{name}/")
    return task.replace(bind_input(canvas, chosen.model_dump(mode="json")))


KIND = NodeKind(decide=decide)
