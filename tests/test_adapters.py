"""How replies become stage outputs (workers/adapters.py): reading plain text by field type, refusing
replies that loop or were cut short, and which adapter each model gets. The cut-reply case runs a real
stage against the project's test LM server; tests/test_local_model.py runs the same path on SmolLM2."""

from typing import Literal

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import track_usage

from contracts.specs import StageSpec
from workers.adapters import (
    PlainFirstAdapter,
    PlainTextAdapter,
    ReplyError,
    SchemaJSONAdapter,
    labelled,
    looping,
    read_plain,
    reasoning_last,
    refuse_loops,
)
from workers.errors import PermanentStageError
from workers.lm import adapter_for
from workers.settings import LMSettings
from workers.stage import StageRunner

LOOP = "The Roman Empire's treatment of its citizens was characterized by a mix of Roman culture. " * 4
PROSE = ("The Rhine rises in the Swiss Alps and flows north through Germany and the Netherlands. Barges carry "
         "coal, grain and containers between Basel, Duisburg and Rotterdam, which makes it one of the busiest "
         "waterways in Europe.")


class Classify(dspy.Signature):
    """Classify the question."""

    question: str = dspy.InputField()
    task_type: Literal["multiple_choice", "short_answer", "essay"] = dspy.OutputField()


def test_a_plain_reply_is_read_by_the_fields_type() -> None:
    assert read_plain(str, ' "Paris." ', "answer") == "Paris."
    assert read_plain(str, "Answer: Paris", "answer") == "Paris"
    assert read_plain(list[str], "- tides\n- the moon\n", "key_terms") == ["tides", "the moon"]
    assert read_plain(list[str], "capital, France", "key_terms") == ["capital", "France"]
    assert read_plain(float, "I am about 0.8 sure", "confidence") == 0.8
    options = Literal["multiple_choice", "short_answer", "essay"]
    assert read_plain(options, "This asks for a short answer, not an essay.", "task_type") == "short_answer"
    with pytest.raises(ValueError, match="names none of multiple_choice, short_answer, essay"):
        read_plain(options, "a question", "task_type")
    with pytest.raises(ValueError, match="no number for `confidence`"):
        read_plain(float, "quite sure", "confidence")


def test_several_fields_are_read_from_labelled_lines_and_a_missing_one_is_named() -> None:
    fields = {"answer": None, "key_terms": None}
    assert labelled(fields, "**Answer:** Paris\nKey terms: capital, France") == {"answer": "Paris",
                                                                                   "key_terms": "capital, France"}
    signature = dspy.Signature("question -> answer, confidence: float")
    with pytest.raises(AdapterParseError, match="no line for confidence"):
        PlainTextAdapter().parse(signature, "Answer: Paris")


def test_looping_text_is_told_from_prose() -> None:
    assert looping(LOOP) and not looping(PROSE) and not looping("Paris " * 5)


def test_repeated_list_items_are_dropped_and_a_looping_field_is_refused() -> None:
    assert refuse_loops([{"tags": ["Rhine", "rhine ", "Europe", "Rhine"]}]) == [{"tags": ["Rhine", "Europe"]}]
    with pytest.raises(ReplyError, match="reply for `answer` repeats itself"):
        refuse_loops([{"answer": LOOP}])


def test_the_schema_adapter_never_repairs_an_incomplete_json_object() -> None:
    signature = dspy.Signature("document -> summary")
    assert SchemaJSONAdapter().parse(signature, '{"summary": "The Rhine."}') == {"summary": "The Rhine."}
    with pytest.raises(AdapterParseError, match="not one complete JSON object"):
        SchemaJSONAdapter().parse(signature, '{"summary": "The Rhine flows from the Alps to')


def test_field_order_and_descriptions_are_what_the_variants_say() -> None:
    chain = dspy.ChainOfThought("question -> answer").predict.signature
    adapter = SchemaJSONAdapter(describe=True, answer_first=True)
    assert list(reasoning_last(chain).output_fields) == ["answer", "reasoning"]
    text = adapter.user_message_output_requirements(dspy.Signature("q -> answer").with_updated_fields(
        "answer", desc="a few words"))
    assert "`answer`: a few words" in text


def test_the_local_model_gets_the_plain_first_adapter_and_other_models_keep_json() -> None:
    assert isinstance(adapter_for(LMSettings()), PlainFirstAdapter)
    assert isinstance(adapter_for(LMSettings(model="openai/gpt-4o-mini")), SchemaJSONAdapter)
    assert type(adapter_for(LMSettings(model="openai/gpt-4o-mini", structured=False))) is dspy.JSONAdapter


def test_a_reply_cut_at_max_tokens_fails_the_stage_with_a_clear_error(lm_url: str) -> None:
    spec = StageSpec(name="summarize", module="examples.basic:Summarize", inputs={"document": "str"},
                     outputs={"summary": "str"})
    runner = StageRunner(spec, LMSettings(model="openai/test-lm", api_base=lm_url, max_tokens=3, cache=False))
    with pytest.raises(PermanentStageError, match=r"summarize.*cut at max_tokens=3 \(finish_reason 'length'\)"):
        runner.run({"document": PROSE})
    roomy = StageRunner(spec, LMSettings(model="openai/test-lm", api_base=lm_url, cache=False))
    assert roomy.run({"document": PROSE}).outputs["summary"]


def test_plain_first_asks_the_answer_plainly_then_the_rest_under_the_schema(lm_url: str) -> None:
    lm = dspy.LM("openai/test-lm", api_base=lm_url, api_key="local", cache=False, num_retries=0)
    with track_usage() as usage, dspy.context(lm=lm, adapter=PlainFirstAdapter()):
        answered = dspy.Predict("question -> answer, confidence: float")(question="What is the capital of France?")
        classified = dspy.Predict(Classify)(question="Write an essay on Rome.")
    assert answered.answer.strip() and isinstance(answered.confidence, float)
    assert classified.task_type in ("multiple_choice", "short_answer", "essay")
    assert len(usage.usage_data["openai/test-lm"]) == 3  # answer, then confidence; the choice in one call
    plain, extraction, choice = (entry["messages"] for entry in lm.history[-3:])
    assert "response_format" not in lm.history[-3]["kwargs"] and "response_format" in lm.history[-2]["kwargs"]
    assert plain[-1]["content"] == "What is the capital of France?"  # a lone input goes as it is
    assert "[[ ## answer ## ]]" in extraction[-1]["content"]  # the plain answer is an input of the second call
    assert "response_format" in lm.history[-1]["kwargs"] and choice
