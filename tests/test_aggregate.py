"""Pure merger and aggregator functions: ties, empty input, one member, normalisation, custom."""

import pytest

from routing.aggregate import (
    MemberOutcome,
    Verdict,
    Vote,
    aggregate,
    best_confidence,
    clamp_confidence,
    conflicts,
    consensus,
    merge_concat,
    merge_fields,
    merger,
    normalise_answer,
    weighted_voting,
)


def votes(*pairs: tuple[str, float]) -> list[Vote]:
    return [Vote(f"m{i}", answer, confidence) for i, (answer, confidence) in enumerate(pairs)]


FAILED = Vote("broken", error="stage 'solver': 503")


def test_answers_are_normalised_before_counting() -> None:
    assert normalise_answer("  The  Rhine. ") == normalise_answer("the rhine") == "the rhine"
    assert normalise_answer("PARIS!") == "paris"
    assert normalise_answer(["b", "a"]) == '["b", "a"]'
    assert normalise_answer(3) == "3"


def test_weighted_voting_weighs_by_confidence_not_by_count() -> None:
    verdict = weighted_voting(votes(("Lyon", 0.2), ("lyon", 0.2), ("Paris", 0.9)))
    assert (verdict.outcome, verdict.answer, verdict.confidence) == ("chosen", "Paris", round(0.9 / 1.3, 4))
    assert verdict.support == ["m2"]
    assert verdict.tally == {"paris": 0.9, "lyon": 0.4}
    assert verdict.tie is False


def test_weighted_voting_reports_the_form_of_its_most_confident_supporter() -> None:
    verdict = weighted_voting(votes(("paris", 0.3), ("Paris.", 0.8), ("Rome", 0.5)))
    assert verdict.answer == "Paris."
    assert verdict.support == ["m0", "m1"]


def test_weighted_voting_tie_broken_by_votes_then_confidence_then_order() -> None:
    by_count = weighted_voting(votes(("a", 0.5), ("a", 0.5), ("b", 1.0)))
    assert (by_count.answer, by_count.tie) == ("a", True)
    by_single = weighted_voting(votes(("a", 0.5), ("b", 0.5)))
    assert (by_single.answer, by_single.tie, by_single.confidence) == ("a", True, 0.5)
    by_best = weighted_voting(votes(("a", 0.25), ("a", 0.25), ("b", 0.4), ("b", 0.1)))
    assert (by_best.answer, by_best.tie) == ("b", True)


def test_weighted_voting_with_all_zero_confidence_counts_votes() -> None:
    verdict = weighted_voting(votes(("x", 0.0), ("y", 0.0), ("y", 0.0)))
    assert (verdict.answer, verdict.confidence) == ("y", round(2 / 3, 4))


def test_failed_members_do_not_vote() -> None:
    verdict = weighted_voting([FAILED, *votes(("Paris", 0.6))])
    assert (verdict.answer, verdict.confidence, verdict.support) == ("Paris", 1.0, ["m0"])


@pytest.mark.parametrize("aggregator", [weighted_voting, best_confidence, consensus])
def test_no_votes_is_a_verdict_without_answer(aggregator) -> None:  # type: ignore[no-untyped-def]
    for empty in ([], [FAILED]):
        verdict = aggregator(empty, 0.5)
        assert (verdict.outcome, verdict.answer, verdict.confidence) == ("no_votes", None, 0.0)


@pytest.mark.parametrize("aggregator", [weighted_voting, best_confidence, consensus])
def test_one_member_decides_alone(aggregator) -> None:  # type: ignore[no-untyped-def]
    verdict = aggregator(votes(("Paris", 0.7)), 0.5)
    assert (verdict.outcome, verdict.answer, verdict.support) == ("chosen", "Paris", ["m0"])


def test_best_confidence_takes_the_top_and_the_earliest_on_a_tie() -> None:
    verdict = best_confidence(votes(("a", 0.4), ("b", 0.9), ("c", 0.9)))
    assert (verdict.answer, verdict.confidence, verdict.support, verdict.tie) == ("b", 0.9, ["m1"], True)
    same = best_confidence(votes(("b", 0.9), ("B", 0.9)))
    assert same.tie is False


def test_consensus_counts_all_members_and_never_picks_arbitrarily() -> None:
    agreed = consensus(votes(("Nile", 0.1), ("nile", 0.2), ("Amazon", 0.99)), 0.6)
    assert (agreed.outcome, agreed.answer, agreed.confidence) == ("chosen", "nile", round(2 / 3, 4))
    below = consensus(votes(("Nile", 0.9), ("nile", 0.9), ("Amazon", 0.9)), 0.7)
    assert (below.outcome, below.answer, below.confidence) == ("no_consensus", None, round(2 / 3, 4))
    # a failed member does not agree: 2 of 4 is below 0.6 even though both answers that came agree
    failed = consensus([*votes(("Nile", 0.9), ("Nile", 0.9)), FAILED, FAILED], 0.6)
    assert (failed.outcome, failed.confidence) == ("no_consensus", 0.5)


def test_consensus_tie_at_the_top_is_no_consensus_even_above_threshold() -> None:
    verdict = consensus(votes(("a", 0.9), ("b", 0.9)), 0.5)
    assert (verdict.outcome, verdict.answer, verdict.tie) == ("no_consensus", None, True)


def test_confidence_is_clamped_and_must_be_a_number() -> None:
    assert clamp_confidence(1.7) == 1.0 and clamp_confidence(-1) == 0.0 and clamp_confidence(0.25) == 0.25
    for bad in ("high", None, True):
        with pytest.raises(ValueError, match="confidence must be a number"):
            clamp_confidence(bad)


def majority_of_lengths(votes: list[Vote], threshold: float) -> Verdict:
    longest = max((v for v in votes if v.ok), key=lambda v: len(str(v.answer)))
    return Verdict("chosen", longest.answer, 1.0, [longest.member])


def test_custom_aggregator_by_import_path() -> None:
    verdict = aggregate("tests.test_aggregate:majority_of_lengths", votes(("ab", 0.1), ("abcd", 0.1)), 0.5)
    assert verdict.answer == "abcd"
    with pytest.raises(ValueError, match=r"cannot load aggregator 'tests\.nowhere:fn'"):
        aggregate("tests.nowhere:fn", votes(("a", 1.0)), 0.5)


OK_A = MemberOutcome("a", {"x": 1, "text": "first"})
OK_B = MemberOutcome("b", {"x": 2, "y": 3, "text": "second"})
BAD = MemberOutcome("c", {}, error="boom")


def test_field_merge_later_member_wins_and_conflicts_are_named() -> None:
    assert merge_fields({}, [OK_A, BAD, OK_B]) == {"x": 2, "y": 3, "text": "second"}
    assert conflicts([OK_A, BAD, OK_B]) == {"x": ["a", "b"], "text": ["a", "b"]}
    assert merge_fields({}, [BAD]) == {}


def test_concat_joins_the_text_field_in_member_order() -> None:
    merged = merge_concat({}, [OK_A, BAD, OK_B], "text", " + ")
    assert merged == {"x": 2, "y": 3, "text": "first + second"}
    lists = merge_concat({}, [MemberOutcome("l", {"text": ["p", "q"]})], "text")
    assert lists["text"] == "p\nq"


def test_merger_names_resolve_and_bad_paths_are_clear() -> None:
    assert merger("fields") is merge_fields
    assert merger("concat", "text")({}, [OK_A, OK_B])["text"] == "first\n\nsecond"
    assert merger("examples.ensemble:ranked_findings").__name__ == "ranked_findings"
    with pytest.raises(ValueError, match=r"cannot load merger 'examples\.ensemble:nothing'"):
        merger("examples.ensemble:nothing")


def test_spec_errors_name_the_bad_value() -> None:
    from pydantic import ValidationError

    from contracts.specs import EnsembleNode, ParallelNode

    stage = {"kind": "stage", "stage": "solver"}
    with pytest.raises(ValidationError, match="merge 'average' is neither one of fields, concat"):
        ParallelNode.model_validate({"members": {"a": stage}, "merge": "average"})
    with pytest.raises(ValidationError, match="merge 'concat' needs 'concat_field'"):
        ParallelNode.model_validate({"members": {"a": stage}, "merge": "concat"})
    with pytest.raises(ValidationError, match="member name 'a b'"):
        ParallelNode.model_validate({"members": {"a b": stage}})
    with pytest.raises(ValidationError, match="aggregator 'vote' is neither one of weighted_voting"):
        EnsembleNode.model_validate({"members": [stage], "aggregator": "vote"})
    with pytest.raises(ValidationError, match="repeated: x"):
        EnsembleNode.model_validate({"members": [{**stage, "id": "x"}, {**stage, "id": "x"}]})
