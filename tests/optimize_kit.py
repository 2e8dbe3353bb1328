"""Shared by the optimisation tests: a small QA training set, a metric that tells candidates apart under the
test LM's `--vary` mode, the `qa` pipeline written as an ordinary in-process DSPy program, and helpers to
optimise it both ways with the same optimiser code (optimize.optimizers.compile_program)."""

import hashlib
from typing import Any

import dspy

from examples.basic import Answer, KeyTerms
from optimize.journal import Journal
from optimize.optimizers import OptimizerOptions, compile_program
from optimize.program import FleetProgram
from optimize.run import client_lm_context, fleet_program
from routing.client import Client
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote Hamlet?", "William Shakespeare"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("How many legs does a spider have?", "eight"),
    ("Which planet is known as the red planet?", "Mars"),
    ("What is the boiling point of water at sea level in Celsius?", "100"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
]


def examples(count: int, start: int = 0) -> list[dspy.Example]:
    return [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in QUESTIONS[start:start + count]]


def vary_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Passes for about half the answers: under the test LM's `--vary` mode an answer's text depends on the
    instructions, demos and temperature its prompt carried, so candidates score differently (and the same
    way wherever they run)."""
    text = f"{example.question}|{getattr(prediction, 'answer', '')}"
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 2 == 0


def always(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Every trace passes: BootstrapFewShot keeps the first ones."""
    return True


class QA(dspy.Module):
    """The `qa` pipeline (pipelines/qa.yaml) as plain DSPy: the same two signatures, composed in-process."""

    def __init__(self) -> None:
        super().__init__()
        self.key_terms = dspy.Predict(KeyTerms)
        self.answer = dspy.Predict(Answer)

    def forward(self, question: str) -> dspy.Prediction:
        terms = self.key_terms(question=question).key_terms
        out = self.answer(question=question, key_terms=terms)
        return dspy.Prediction(answer=out.answer, confidence=out.confidence)


def in_process(lm_url: str, options: OptimizerOptions, train: list[dspy.Example],
               dev: list[dspy.Example] | None) -> dspy.Module:
    """DSPy's optimiser on the in-process program, with the LM and adapter the workers use."""
    settings = LMSettings(model="openai/test-lm", api_base=lm_url, cache=False)
    with dspy.context(lm=lm_for(settings), adapter=adapter_for(settings)):
        return compile_program(QA(), vary_metric, train, dev, options)


def on_fleet(client: Client, options: OptimizerOptions, train: list[dspy.Example], dev: list[dspy.Example] | None,
             journal: Journal | None = None) -> FleetProgram:
    """The same optimiser on the proxy of `qa`: every evaluation a job on the fleet."""
    program, _ = fleet_program(client, "qa", None, journal or Journal(None, False), job_timeout=300)
    with client_lm_context(client):
        compiled = compile_program(program, vary_metric, train, dev, options)
    assert isinstance(compiled, FleetProgram)
    return compiled


def programs_state(program: dspy.Module) -> dict[str, Any]:
    """Each predictor's instructions and demos (what `save` writes), by predictor name."""
    return {name: {"instructions": p.signature.instructions,
                   "demos": [dict(d.toDict() if hasattr(d, "toDict") else d) for d in p.demos]}
            for name, p in program.named_predictors()}
