"""Distribution changes nothing but speed: the multi-hop pipeline on workers equals plain DSPy in-process.

The same stage modules run once as Stagecoach jobs (one queue per stage, retrieval fanned out by
the map node) and once composed as an ordinary `dspy.Module`, both against the deterministic test
LM with the same LM settings and adapter. Every answer field must match, and so must the token
counts the LM reports, which are derived from the full prompts, so the prompts match too.
"""

from pathlib import Path

import dspy

from examples.multihop import MultiHopQA, build_multi_hop_qa_pipeline
from monitor.evaluation import load_examples
from routing.client import Client
from workers.lm import adapter_for, lm_for
from workers.settings import LMSettings

QUESTIONS = 24
FIELDS = ["question", "sub_questions", "retrieved_facts", "retrieved_titles", "final_answer"]


def in_process(program: MultiHopQA, lm_url: str, question: str) -> dspy.Prediction:
    settings = LMSettings(model="openai/test-lm", api_base=lm_url, cache=False)  # as the workers are set up
    with dspy.context(lm=lm_for(settings), adapter=adapter_for(settings), track_usage=True):
        return program(question=question)


def test_distributed_pipeline_equals_in_process_module(client: Client, lm_url: str, hotpotqa: Path) -> None:
    examples = load_examples(hotpotqa, limit=QUESTIONS)
    handles = [client.submit("multihop_hotpotqa", {"question": e.question}) for e in examples]
    program = build_multi_hop_qa_pipeline(str(hotpotqa), format="hotpotqa")
    assert len(examples) == QUESTIONS
    for example, handle in zip(examples, handles, strict=True):
        remote = handle.get(timeout=180)
        assert remote.state == "succeeded", remote.error
        local = in_process(program, lm_url, example.question)
        assert list(remote.answer) == FIELDS
        for name in FIELDS:
            assert remote.answer[name] == local[name], f"{name} differs for {example.id}"
        used = next(iter(local.get_lm_usage().values()))
        assert sum(u.prompt_tokens for u in remote.usage.values()) == used["prompt_tokens"], example.id
        assert sum(u.completion_tokens for u in remote.usage.values()) == used["completion_tokens"], example.id
        hops = len(local.sub_questions)
        assert [t.stage for t in remote.timings].count("retrieve_hotpotqa") == hops
