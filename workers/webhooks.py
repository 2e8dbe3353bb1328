"""Completion webhooks, the ledger's side: once a job has ended, its webhook's delivery is queued.

`Ledger.announce` (the one place a job's end is acted on) calls `Deliveries.after_close`: the job's
webhook is the one its request named (recorded at start in the job's checkpoint, field `webhook`), else
its pipeline's default. The delivery itself is a task on the webhook queue (workers/webhook_task.py),
so no stage worker ever waits on a receiver. The delivery state shows in the job's status.
"""

import logging
import time
from typing import Any

from celery import Celery
from pydantic import ValidationError

from contracts.catalog import Catalog
from contracts.jobs import JobResult
from contracts.names import WEBHOOK_QUEUE, WEBHOOK_TASK
from contracts.webhooks import Webhook, WebhookDelivery
from workers.jobs import JobStore

log = logging.getLogger(__name__)


def webhook_of(raw: Any) -> Webhook | None:
    """A request's `webhook` as a Webhook; None when it names none or one that is not a webhook (a rejected
    request may hold anything)."""
    if raw is None:
        return None
    try:
        return Webhook.model_validate(raw)
    except ValidationError:
        return None


class Deliveries:
    def __init__(self, app: Celery, jobs: JobStore, catalog: Catalog | None) -> None:
        self.app = app
        self.jobs = jobs
        self.catalog = catalog

    def after_close(self, result: JobResult, named: Webhook | None) -> None:
        """Queue the delivery of the job's webhook (the one its request `named`, else its pipeline's default),
        if it has one: its status says `pending` until the delivery task reports."""
        webhook = named or self._default(result.pipeline)
        if webhook is None:
            return
        self.jobs.webhook(result.job_id, WebhookDelivery(state="pending", url=webhook.url, updated_at=time.time()))
        self.app.send_task(
            WEBHOOK_TASK, args=[result.job_id, webhook.model_dump(mode="json"), result.model_dump(mode="json")],
            queue=WEBHOOK_QUEUE, ignore_result=True,
            # what Flower shows: never the secret (nor the whole JobResult)
            argsrepr=f"({result.job_id!r}, {{'url': {webhook.url!r}}}, <JobResult>)", kwargsrepr="{}")

    def _default(self, pipeline: str) -> Webhook | None:
        if self.catalog is None or not pipeline:
            return None
        try:
            return self.catalog.pipeline(pipeline).webhook
        except Exception:  # the catalog no longer has it: no default to call
            return None
