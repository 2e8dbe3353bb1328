"""Ensembles end to end on the session fleet: members' answers pinned with `[[lm:set:...]]` markers."""

from typing import Any

from routing.client import Client


def pin(answer: str, confidence: float) -> str:
    return f"[[lm:set:answer={answer}]] [[lm:set:confidence={confidence}]]"


def by_member(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["member"]: m for m in report["members"]}


def test_weighted_voting_counts_normalised_answers_by_confidence(client: Client) -> None:
    inputs = {"question": "Capital of France?", "persona_a": pin("Paris", 0.9), "persona_b": pin(" paris. ", 0.6),
              "persona_c": pin("Lyon", 0.95)}
    result = client.submit("ens_vote", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == "Paris"  # the form its most confident supporter gave
    assert result.answer["confidence"] == round(1.5 / 2.45, 4)
    report = result.answer["ensemble"]
    assert report["outcome"] == "chosen" and report["support"] == ["a", "b"]
    assert report["tally"] == {"paris": 1.5, "lyon": 0.95}
    assert by_member(report)["c"] == {"member": "c", "ok": True, "answer": "Lyon", "confidence": 0.95, "error": None}
    assert {"vote/a", "vote/b", "vote/c", "vote"} == set(result.outputs)
    assert result.usage["solver"].calls == 3


def test_a_failing_member_is_reported_and_the_rest_vote(client: Client) -> None:
    inputs = {"question": "Capital of Italy?", "persona_a": pin("Rome", 0.7), "persona_b": "[[lm:status=400]]",
              "persona_c": pin("Milan", 0.2)}
    result = client.submit("ens_vote", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == "Rome"
    members = by_member(result.answer["ensemble"])
    assert members["b"]["ok"] is False and members["b"]["answer"] is None
    assert "400" in members["b"]["error"]
    assert [e.node for e in result.errors] == ["vote/b"]


def test_consensus_below_threshold_is_a_clear_no_consensus(client: Client) -> None:
    inputs = {"question": "Best river?", "persona_a": pin("Rhine", 0.9), "persona_b": pin("Danube", 0.9),
              "persona_c": pin("Seine", 0.9)}
    result = client.submit("ens_consensus", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] is None
    report = result.answer["ensemble"]
    assert report["outcome"] == "no_consensus"
    assert report["confidence"] == round(1 / 3, 4)
    assert [d.choice for d in result.trail] == ["no_consensus"]


def test_consensus_reached_by_two_of_three(client: Client) -> None:
    inputs = {"question": "Longest river?", "persona_a": pin("Nile", 0.5), "persona_b": pin("NILE", 0.4),
              "persona_c": pin("Amazon", 0.99)}
    result = client.submit("ens_consensus", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == "Nile"
    assert result.answer["confidence"] == round(2 / 3, 4)


def test_best_confidence_takes_the_single_most_confident(client: Client) -> None:
    inputs = {"question": "Capital?", "persona_a": pin("Paris", 0.4), "persona_b": pin("Rome", 0.8)}
    result = client.submit("ens_best", inputs).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert (result.answer["answer"], result.answer["confidence"]) == ("Rome", 0.8)
    assert result.answer["ensemble"]["support"] == ["b"]


def test_every_member_failing_fails_the_job(client: Client) -> None:
    inputs = {"question": "Q?", "persona_a": "[[lm:status=400]]", "persona_b": "[[lm:status=403]]"}
    result = client.submit("ens_best", inputs).get(timeout=60)
    assert result.state == "failed"
    assert result.error is not None and result.error.error_type == "PipelineError"
    assert result.error.message.startswith("all 2 members of ensemble 'best' failed: a: stage 'solver'")
    assert "b: stage 'solver'" in result.error.message and "403" in result.error.message


def test_sequence_member_and_ensemble_inside_a_sequence(client: Client) -> None:
    result = client.submit("ens_mixed", {"question": "Why is the sea salty?"}).get(timeout=90)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == "answer of <Why is the sea salty?>"
    report = result.answer["ensemble"]
    assert report["support"] == ["direct", "chain"] and result.answer["confidence"] == 1.0
    assert result.answer["headline"] == "headline of <answer of <Why is the sea salty?>>"
    assert sorted(t.node for t in result.timings) == ["headline", "mixed/chain/answer", "mixed/chain/key_terms",
                                                      "mixed/direct"]
    assert "key_terms" not in result.fields  # members' other fields are not merged into the state
