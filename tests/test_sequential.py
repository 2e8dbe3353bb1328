"""Sequential pipelines end to end: real workers, one per stage queue, over real Redis."""

from celery import Celery

from contracts.names import ROUTING_QUEUE, RUN_TASK
from routing.client import Client
from tests.services import Fleet


def test_qa_pipeline_flows_stage_by_stage(client: Client) -> None:
    result = client.submit("qa", {"question": "What is the capital of France?"}).get(timeout=60)
    assert result.state == "succeeded", result.error
    assert result.answer["answer"] == "answer of <What is the capital of France?>"
    assert result.fields["key_terms"][0].startswith("key_terms 1 of <What is the capital of France?")
    assert [t.stage for t in result.timings] == ["key_terms", "answer"]
    assert set(result.outputs) == {"key_terms", "answer"}
    assert result.usage["answer"].calls == 1


def test_each_stage_runs_on_its_own_worker(client: Client, fleet: Fleet) -> None:
    result = client.submit("digest", {"document": "Rivers carry barges."}).get(timeout=60)
    assert result.state == "succeeded", result.error
    workers = {t.stage: t.worker for t in result.timings}
    assert set(workers) == {"summarize", "headline"}
    assert workers["summarize"].startswith("stage-summarize@")
    assert workers["headline"].startswith("stage-headline@")


def test_workers_consume_only_their_own_queue(app: Celery, fleet: Fleet) -> None:
    replies = app.control.inspect(timeout=5).active_queues() or {}
    by_worker = {name.split("@")[0]: sorted(q["name"] for q in queues) for name, queues in replies.items()}
    for worker in fleet.workers:
        assert by_worker[worker.name] == sorted(worker.queues)


def test_enqueue_by_name_with_plain_json(app: Celery, fleet: Fleet) -> None:
    """What a service in another language does: send_task by name, JSON payload, no project import."""
    sent = app.send_task(RUN_TASK, args=[{"pipeline": "qa", "inputs": {"question": "Why is the sky blue?"}}],
                         queue=ROUTING_QUEUE)
    result = sent.get(timeout=60)
    assert result["state"] == "succeeded"
    assert result["answer"]["answer"] == "answer of <Why is the sky blue?>"
