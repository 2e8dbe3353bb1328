"""The Python client: submit jobs by pipeline name, follow their status, read their results."""

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import redis
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from pydantic import ValidationError

from contracts.candidates import StageCandidate
from contracts.envelope import Envelope, ErrorRecord
from contracts.errors import ContractError, FieldProblem
from contracts.fields import problems_of
from contracts.jobs import JobRequest, JobResult, JobStatus
from contracts.specs import PipelineSpec
from contracts.webhooks import Webhook, refused
from routing.compile import Compiler
from routing.errors import BrokerUnavailableError, JobTimeoutError, PipelineError, RedisFullError
from routing.nodes import KINDS
from routing.tasks import start_envelope
from workers.checkpoint import BROKER_DOWN, Begin, Claim
from workers.events import local_hostname
from workers.jobs import MISSING
from workers.ledger import Closer
from workers.runtime import Runtime


class JobHandle:
    def __init__(self, client: "Client", job_id: str) -> None:
        self.client = client
        self.id = job_id

    def status(self) -> JobStatus:
        return self.client.status(self.id)

    def ready(self) -> bool:
        return bool(AsyncResult(self.id, app=self.client.app).ready())

    def get(self, timeout: float | None = None, raise_errors: bool = False) -> JobResult:
        """Wait for the JobResult (riding out a Redis restart meanwhile). With raise_errors, a failed
        job raises PipelineError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                raw = notified_or_stored(AsyncResult(self.id, app=self.client.app), _slice(left))
                break
            except CeleryTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeoutError(f"job {self.id} not finished after {timeout}s", self.id) from None
            except BROKER_DOWN:  # the result connection broke (Redis restarting): read again
                if self._stored_failure():
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeoutError(f"job {self.id} not finished after {timeout}s (Redis unreachable)",
                                          self.id) from None
                time.sleep(0.5)
        result = JobResult.model_validate(raw)
        if raise_errors and result.error is not None:
            raise PipelineError(result.error.message, self.id)
        return result

    def output(self, field: str, timeout: float | None = None, poll: float = 0.05) -> Any:
        """One answer field, as soon as it is final: while the job still runs when the pipeline
        can deliver it early (routing/lazy.py), else from the result. A failed job raises
        PipelineError, so does a job that finished without the field."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            value = self.client.runtime.jobs.published(self.id, field)
            if value is not MISSING:
                return value
            if self.ready():
                return self._from_result(field)
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeoutError(f"job {self.id}: field '{field}' not there after {timeout}s", self.id)
            time.sleep(poll)

    def _from_result(self, field: str) -> Any:
        result = self.get(raise_errors=True)
        if field in result.fields:
            return result.fields[field]
        raise PipelineError(f"job {self.id} finished without field '{field}'; answer: {', '.join(result.answer)}",
                            self.id)

    def _stored_failure(self) -> bool:
        """Whether the job's own result is a stored connection error (not a broken read)."""
        try:
            return bool(AsyncResult(self.id, app=self.client.app).state == "FAILURE")
        except BROKER_DOWN:
            return False

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"


class Client:
    """Starts jobs itself, through the job ledger as `pipeline.run` does (record, then send): it compiles
    the job's canvas and sends it, so a job costs no `pipeline.run` hop (that task stays for clients in
    other languages, which send a plain JSON request by name)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.app = runtime.app
        self.ledger = runtime.ledger
        self.compiler = Compiler(runtime.app, runtime.catalog, KINDS)

    def submit(self, pipeline: str, inputs: dict[str, Any], job_id: str | None = None,
               version: str | None = None, outputs: list[str] | None = None, priority: int | None = None,
               webhook: Webhook | None = None, metadata: dict[str, Any] | None = None,
               candidates: dict[str, StageCandidate] | None = None) -> JobHandle:
        """Validate inputs against the pipeline's contract now (raises ContractError), then enqueue
        the validated (coerced) inputs; `job_id` defaults to a fresh one. `pipeline` may pin a
        version (`qa@2`), or `version` may; otherwise the latest runs. `outputs` asks for only
        some declared outputs: stages that feed only the others are skipped. `priority` 0-9 (9 most
        urgent), `webhook` called once the job ends, `metadata` kept with its status. `candidates`: an
        optimiser's candidate per stage (contracts/candidates.py)."""
        checked = self.runtime.catalog.validate_inputs(pipeline, inputs, version)
        self.runtime.catalog.wanted_outputs(pipeline, outputs, version)
        fresh = job_id is None
        job_id = job_id or uuid.uuid4().hex
        try:
            request = JobRequest(pipeline=pipeline, version=version, inputs=checked, outputs=outputs,
                                 priority=priority, webhook=webhook, metadata=metadata, candidates=candidates)
        except ValidationError as error:
            raise ContractError("job request", problems_of(error)) from None
        check_size(request, self.runtime.settings.max_request_bytes)
        check_webhook(request, self.runtime.settings.webhook.allow)
        payload = request.model_dump(mode="json")
        envelope, spec, pinned = start_envelope(self.runtime.catalog, payload, job_id)  # versions pinned, lazy plan
        canvas = self.compiler.job(spec, envelope, priority)
        self._start(envelope, payload, pinned, canvas, fresh)
        return JobHandle(self, job_id)

    def _start(self, envelope: Envelope, request: dict[str, Any], pinned: PipelineSpec, canvas: Signature,
               fresh: bool) -> None:
        """Record the job in the ledger (request, pinned versions, queued status, watch deadline), then send
        its chain, whose last task answers under the job id. The record is sent to Redis first; for a
        `fresh` job id (one this client made) its reply is read after the chain is sent, so the round trips
        overlap; a job id the caller chose is checked first: one that was started already is refused."""
        job_id = envelope.job_id
        owner = f"client:{uuid.uuid4().hex}"  # this attempt: sent again after a lost reply, the same start

        def record() -> Claim:
            return self.ledger.start(envelope, request, pinned, "client", owner, final=True)

        pending: Callable[[], Claim] | None = None
        if fresh:
            with contextlib.suppress(*BROKER_DOWN):  # Redis away: recorded below, with retries, before sending
                pending = self.ledger.start_sent(envelope, request, pinned, "client", owner, final=True)
        if pending is None:
            self._claimed(job_id, self._recorded(job_id, record, again=record))
        try:
            self._with_retries(lambda: canvas.apply_async(task_id=job_id, root_id=job_id))
        except BrokerUnavailableError as error:  # recorded but never sent: end it, so nobody waits on it
            record_error = ErrorRecord(node="", kind="message", error_type=type(error).__name__, message=str(error))
            with contextlib.suppress(*BROKER_DOWN):
                self._recorded(job_id, pending or record)
                self.ledger.fail(job_id, record_error, Closer(local_hostname("client")), envelope.pipeline, {})
            raise
        except redis.exceptions.OutOfMemoryError as error:  # Redis refused the message: and the record?
            if pending is not None:
                self._recorded(job_id, pending)
            raise self._full(job_id, error) from None
        if pending is not None:
            self._claimed(job_id, self._recorded(job_id, pending, again=record))

    def _recorded(self, job_id: str, read: Callable[[], Claim], again: Callable[[], Claim] | None = None) -> Claim:
        """The start's claim, riding out a Redis restart (`again` sends the same start anew: idempotent)."""
        try:
            try:
                return read()
            except BROKER_DOWN:
                if again is None:
                    raise
                claims: list[Claim] = []
                self._with_retries(lambda: claims.append(again()))
                return claims[-1]
        except redis.exceptions.OutOfMemoryError as error:  # the start script writes all of its keys or none
            raise self._full(job_id, error) from None

    def _full(self, job_id: str, error: Exception) -> RedisFullError:
        return RedisFullError(
            f"job {job_id} not started: Redis at {safe_url(self.runtime.settings.backend_url)} refused the "
            f"write ({error}); it is at maxmemory. Stagecoach needs maxmemory-policy noeviction and room "
            "for its jobs' records (docs/reliability.md: Redis memory)", job_id)

    @staticmethod
    def _claimed(job_id: str, claim: Claim) -> None:
        if claim.begin is not Begin.RUN:
            raise ContractError("job request", [FieldProblem("job_id", f"job {job_id} was started already")])

    def _with_retries(self, publish: Callable[[], None]) -> None:
        """Retry while the broker is unreachable (a Redis restart), for at most STAGECOACH_PUBLISH_RETRY_SECONDS."""
        settings = self.runtime.settings
        deadline = time.monotonic() + settings.publish_retry_seconds
        pause = 0.2
        while True:
            try:
                publish()
                return
            except BROKER_DOWN as error:
                if time.monotonic() + pause > deadline:
                    raise BrokerUnavailableError(
                        f"cannot publish the job to the broker at {safe_url(settings.broker_url)} after "
                        f"{settings.publish_retry_seconds:g}s (STAGECOACH_PUBLISH_RETRY_SECONDS): "
                        f"{type(error).__name__}: {error}") from None
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    def status(self, job_id: str) -> JobStatus:
        return self.runtime.jobs.status(job_id)




# the longest a wait relies on the result's notification alone before reading the stored result
NOTIFICATION_WAIT = 5.0


def _slice(left: float | None) -> float:
    return NOTIFICATION_WAIT if left is None else min(left, NOTIFICATION_WAIT)


def notified_or_stored(result: AsyncResult, wait: float) -> Any:
    """The result once Celery notifies it, waiting at most `wait`; then the stored result if it is
    there (Celery's Redis result consumer can miss a notification under bursts), else CeleryTimeout."""
    try:
        return result.get(timeout=wait, propagate=True)
    except CeleryTimeout:
        stored = AsyncResult(result.id, app=result.app)
        if stored.ready():
            return stored.get(propagate=True)
        raise


def safe_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
    return parsed._replace(netloc=netloc).geturl()


def check_webhook(request: JobRequest, allowed: list[str]) -> None:
    """Refuse a webhook URL off the allow-list (STAGECOACH_WEBHOOK_ALLOW) now, not when the job ends."""
    problem = refused(request.webhook.url, allowed) if request.webhook is not None else None
    if problem is not None:
        raise ContractError("job request", [FieldProblem("webhook.url", problem)])


def check_size(request: JobRequest, max_bytes: int) -> None:
    """Refuse a request bigger than STAGECOACH_MAX_REQUEST_BYTES before it reaches the broker."""
    size = len(request.model_dump_json(exclude_none=True))
    if size > max_bytes:
        raise ContractError(f"pipeline '{request.pipeline}' inputs", [FieldProblem(
            "inputs", f"request of {size} bytes exceeds STAGECOACH_MAX_REQUEST_BYTES ({max_bytes})")])
