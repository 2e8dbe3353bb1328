"""The multi-hop signatures with the REAL default LM (SmolLM2-135M via llama.cpp): every reply parses or
fails with the guards' error (a looping passage reading).

The local model's adapter (`PlainFirstAdapter`) asks each chain of thought's reasoning in plain words,
then sends the remaining outputs as a JSON schema, which llama.cpp turns into constrained decoding; a
135M model then cannot produce JSON that fails to parse or misses a field. Each stage module is called
once in-process (the workers call the very same modules), and the raw reply of every extraction call
must be a complete JSON object with exactly the signature's outputs after the reasoning.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest

from cli.fleet import local_lm_server
from examples.multihop import DecomposeStage, RetrieveStage, SynthesizeStage
from tests.services import ROOT
from workers.adapters import ReplyError
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings

CORPUS = ROOT / "examples" / "data" / "corpus.jsonl"
QUESTION = "Who taught the chief engineer of the Northwind Railway?"


@pytest.fixture(scope="module")
def local_lm() -> Iterator[str]:
    with local_lm_server() as url:
        yield url


def raw_reply(lm: dspy.LM) -> dict[str, Any]:
    """The last LM call's text, parsed strictly (no repair)."""
    text = lm.history[-1]["outputs"][0]
    reply: dict[str, Any] = json.loads(text if isinstance(text, str) else text["text"])
    return reply


@pytest.mark.timeout(900)  # seconds per call on 2 busy cores
def test_every_multihop_signature_parses_with_smollm2(local_lm: str, tmp_path: Path) -> None:
    settings = LMSettings(api_base=local_lm, cache=False, timeout=600)
    lm = lm_for(settings)
    with dspy.context(lm=lm, adapter=adapter_for(settings)):
        decomposed = DecomposeStage()(question=QUESTION)
        assert set(raw_reply(lm)) == {"sub_questions"} and decomposed.reasoning.strip()
        subs = decomposed.sub_questions
        assert 1 <= len(subs) <= 5 and all(isinstance(s, str) and s.strip() for s in subs)

        fact = read_passages(subs[0], lm, tmp_path)
        answer = SynthesizeStage()(original_question=QUESTION, retrieved_facts=[fact])
        assert set(raw_reply(lm)) == {"final_answer"}
        assert isinstance(answer.final_answer, str) and answer.final_answer.strip()


def read_passages(sub_question: str, lm: dspy.LM, tmp_path: Path) -> str:
    """The retrieve stage's facts; when SmolLM2 loops while reading the passages (it often does), the
    stage must fail with the guard's error naming the field, not return the loop; the synthesis then
    gets the fact from the corpus instead."""
    try:
        hop = RetrieveStage(str(CORPUS), k=3, cache_dir=str(tmp_path))(sub_question=sub_question)
    except ReplyError as error:
        assert "reply for `retrieved_info` repeats itself" in str(error)
        return "The Northwind Railway's chief engineer was Piet Lorne, an apprentice of Ada Vorn."
    assert set(raw_reply(lm)) == {"retrieved_info"}
    assert isinstance(hop.retrieved_info, str) and hop.retrieved_info.strip()
    return str(hop.retrieved_info)
