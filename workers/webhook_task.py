"""The webhook delivery task, on the webhook queue (`stagecoach up` and compose run a worker for it).

One POST of the JobResult per attempt, signed (contracts/webhooks.py), without following redirects
(a redirect could lead off the allow-list). A 2xx answer delivers it; anything else (another status, a
timeout, a refused connection) is retried with exponential backoff until STAGECOACH_WEBHOOK_ATTEMPTS,
then dead-lettered. A URL off the allow-list is dead-lettered at once, never called.
"""

import json
import logging
import time
from typing import Any

import httpx
from celery import Celery, Task

from contracts.connections import redis_client
from contracts.deadletters import DeadLetter
from contracts.names import WEBHOOK_QUEUE, WEBHOOK_TASK
from contracts.webhooks import SIGNATURE_HEADER, Webhook, WebhookDelivery, refused, sign
from workers.deadletter import MAX_RAW_BYTES, DeadLetterStore
from workers.jobs import JobStore
from workers.settings import Settings, WebhookSettings

log = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """One attempt did not deliver: the receiver's status, or why there was none."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def post(webhook: Webhook, job_id: str, body: bytes, attempt: int, timeout: float) -> int:
    """One signed delivery; returns the receiver's status (raises DeliveryFailed unless 2xx)."""
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(webhook.secret, body),
               "Stagecoach-Job": job_id, "Stagecoach-Attempt": str(attempt), "User-Agent": "stagecoach-webhook/1"}
    try:
        response = httpx.post(webhook.url, content=body, headers=headers, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as error:
        raise DeliveryFailed(f"{type(error).__name__}: {error}") from None
    if not 200 <= response.status_code < 300:
        raise DeliveryFailed(f"HTTP {response.status_code}", response.status_code)
    return response.status_code


def backoff(settings: WebhookSettings, attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: backoff, doubled per attempt, at most backoff_max."""
    return float(min(settings.backoff * 2 ** (attempt - 1), settings.backoff_max))


def register_webhook_task(app: Celery, settings: Settings, jobs: JobStore) -> None:
    hooks = settings.webhook
    dead_letters = DeadLetterStore(redis_client(settings.backend_url, settings.sentinel), settings.dead_letter_max)

    @app.task(name=WEBHOOK_TASK, shared=False, bind=True, queue=WEBHOOK_QUEUE, acks_late=True, ignore_result=True,
              max_retries=None)
    def deliver(self: Task, job_id: str, webhook: dict[str, Any], result: dict[str, Any]) -> None:
        hook = Webhook.model_validate(webhook)
        attempt = int(self.request.retries) + 1
        problem = refused(hook.url, hooks.allow)
        if problem is not None:
            return _dead(dead_letters, jobs, self, job_id, hook, attempt - 1, None, f"not called: {problem}")
        body = json.dumps(result, separators=(",", ":")).encode()
        try:
            status = post(hook, job_id, body, attempt, hooks.timeout)
        except DeliveryFailed as error:
            if attempt >= hooks.attempts:
                return _dead(dead_letters, jobs, self, job_id, hook, attempt, error.status, str(error))
            jobs.webhook(job_id, WebhookDelivery(state="retrying", url=hook.url, attempts=attempt,
                                                 last_status=error.status, last_error=str(error),
                                                 updated_at=time.time()))
            raise self.retry(countdown=backoff(hooks, attempt)) from None
        now = time.time()
        jobs.webhook(job_id, WebhookDelivery(state="delivered", url=hook.url, attempts=attempt, last_status=status,
                                             delivered_at=now, updated_at=now))
        return None


def _dead(store: DeadLetterStore, jobs: JobStore, task: Task, job_id: str, hook: Webhook, attempts: int,
          status: int | None, reason: str) -> None:
    """Give a delivery up: a dead letter (without the secret) and the job's status say why."""
    log.error("webhook of job %s to %s dead-lettered after %d attempt(s): %s", job_id, hook.url, attempts, reason)
    raw = json.dumps({"job_id": job_id, "url": hook.url}).encode()
    store.add(DeadLetter.of(f"{WEBHOOK_TASK}: {hook.url}: {reason} (after {attempts} attempt(s))", raw, WEBHOOK_QUEUE,
                            MAX_RAW_BYTES, {"task": WEBHOOK_TASK, "task_id": str(task.request.id), "root_id": job_id},
                            source="task"))
    jobs.webhook(job_id, WebhookDelivery(state="dead-lettered", url=hook.url, attempts=attempts, last_status=status,
                                         last_error=reason, updated_at=time.time()))
