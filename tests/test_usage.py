"""Usage counts every LM call a stage makes, not one per model (a module calling the LM three times
reports three calls), through a real LM call to the test LM server."""

import dspy

from contracts.specs import StageSpec
from workers.settings import LMSettings
from workers.stage import StageRunner

TEST_LM_MODEL = "openai/test-lm"


class Answer(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class ThreeCalls(dspy.Module):
    """Asks the LM three times (three differently worded questions), returns the last answer."""

    def __init__(self) -> None:
        super().__init__()
        self.ask = dspy.Predict(Answer)

    def forward(self, question: str) -> dspy.Prediction:
        for round_ in range(3):
            answer = self.ask(question=f"{question} (round {round_})").answer
        return dspy.Prediction(answer=answer)


def runner(lm_url: str, module: str) -> StageRunner:
    spec = StageSpec.model_validate({"name": "thrice", "module": module, "inputs": {"question": "str"},
                                     "outputs": {"answer": "str"}})
    return StageRunner(spec, LMSettings(model=TEST_LM_MODEL, api_base=lm_url, cache=False))


def test_a_module_that_calls_the_lm_three_times_counts_three_calls(lm_url: str) -> None:
    run = runner(lm_url, "tests.test_usage:ThreeCalls").run({"question": "Why is the sea salty?"})
    assert run.usage.calls == 3
    assert run.usage.prompt_tokens > 0 and run.usage.completion_tokens > 0


def test_one_call_counts_one(lm_url: str) -> None:
    run = runner(lm_url, "tests.test_usage:Answer").run({"question": "Why is the sky blue?"})
    assert run.usage.calls == 1
