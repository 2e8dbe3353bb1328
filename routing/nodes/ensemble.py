"""Ensembles: N members on the same input, then an aggregator in the chord body.

Launch, fan-in, time limits and partial failure are the parallel node's (`routing.nodes.parallel`);
this module turns the members' results into votes and the verdict into the job's state.

Confidence is an output field of each member's contract (`confidence: float`, in [0, 1]; named
by `confidence_field`): the member's final state holds its answer and confidence. A member
without a confidence field votes with weight 1.0; one whose confidence is not a number, or that
produced no answer, counts as failed. Members' other state changes are not merged (they would
clash); their outputs, timings, errors and usage are kept under `<path>/<member>/...`.
"""

from typing import Any

from contracts.envelope import Decision, Envelope
from contracts.specs import EnsembleNode
from routing.aggregate import Verdict, Vote, aggregate, clamp_confidence
from routing.chords import Member, all_failed


def vote_of(node: EnsembleNode, member: Member) -> Vote:
    if member.envelope is None or member.error is not None:
        return Vote(member.name, error=member.error.message if member.error else "no result")
    state = member.envelope.state
    if node.answer_field not in state or state[node.answer_field] is None:
        return Vote(member.name, error=f"member produced no '{node.answer_field}'")
    try:
        confidence = clamp_confidence(state.get(node.confidence_field, 1.0))
    except ValueError as error:
        return Vote(member.name, error=f"'{node.confidence_field}': {error}")
    return Vote(member.name, state[node.answer_field], confidence)


def report(node: EnsembleNode, verdict: Verdict, votes: list[Vote]) -> dict[str, Any]:
    """The aggregated answer, its confidence, and every member's result or error."""
    members = [{"member": v.member, "ok": v.ok, "answer": v.answer, "confidence": v.confidence if v.ok else None,
                "error": v.error} for v in votes]
    return {**verdict.report(), "aggregator": node.aggregator, "members": members}


def finish_ensemble(node: EnsembleNode, path: str, job: Envelope, base: Envelope, members: list[Member]) -> Envelope:
    votes = [vote_of(node, member) for member in members]
    if not any(vote.ok for vote in votes):
        causes = [(vote.member, vote.error or "") for vote in votes]
        return job.with_error(all_failed("ensemble", path, causes), fatal=True)
    verdict = aggregate(node.aggregator, votes, node.threshold)
    full = report(node, verdict, votes)
    state = {**job.state, node.answer_field: verdict.answer, node.confidence_field: verdict.confidence,
             node.report_field: full}
    decision = Decision(node=path, kind="ensemble", choice=verdict.outcome,
                        detail={"aggregator": node.aggregator, "confidence": verdict.confidence, "tie": verdict.tie})
    return job.model_copy(update={"state": state, "outputs": {**job.outputs, path: full}}).with_decision(decision)
