"""Submitting jobs and reading them back for the CLI (validation happens in the Python client)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from cli import render
from cli.inputs import InputError, Line, read_lines
from cli.stack import broker_reachable, redact, redis_reachable
from contracts.errors import StagecoachError, encodable
from contracts.jobs import JobResult
from routing.client import Client, JobHandle
from workers.factory import create_runtime
from workers.settings import Settings

STATE_FILE = Path(".stagecoach") / "stack.json"


class BrokerUnreachable(StagecoachError):
    pass


def client_settings(state_file: Path = STATE_FILE) -> Settings:
    """Settings from the environment; when no broker URL is set there and the default is down, the
    URL `stagecoach up` recorded (it starts its own Redis on a free port when it must)."""
    settings = Settings()
    if "STAGECOACH_BROKER_URL" in os.environ or redis_reachable(settings.broker_url):
        return settings
    recorded = _recorded_broker(state_file)
    if recorded and redis_reachable(recorded):
        return settings.model_copy(update={"broker_url": recorded, "result_backend": recorded})
    return settings


def _recorded_broker(state_file: Path) -> str | None:
    try:
        return str(json.loads(state_file.read_text())["broker_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_client(settings: Settings) -> Client:
    if not broker_reachable(settings.broker_url):
        raise BrokerUnreachable(f"cannot reach the broker at {redact(settings.broker_url)}: start the stack with "
                                "`stagecoach up` or set STAGECOACH_BROKER_URL")
    return Client(create_runtime(settings))


@dataclass(frozen=True)
class Submitted:
    line: int
    handle: JobHandle | None
    problem: str | None = None


def submit_file(client: Client, pipeline: str, path: Path) -> list[Submitted]:
    """One job per line; a bad line is reported with its number and does not stop the others."""
    lines = list(read_lines(path))
    if not lines:
        raise InputError(f"--input-file {path}: no job lines")
    submitted: list[Submitted] = []
    with Progress(transient=True, console=render.err, disable=not render.err.is_terminal) as progress:
        task = progress.add_task(f"submitting {len(lines)} jobs", total=len(lines))
        for line in lines:
            submitted.append(_submit_line(client, pipeline, line))
            progress.advance(task)
    return submitted


def _submit_line(client: Client, pipeline: str, line: Line) -> Submitted:
    """The line's job, or why it has none. Whatever one line raises is that line's outcome: the next
    line is still submitted, and every line is reported."""
    if line.inputs is None:
        return Submitted(line.number, None, line.problem)
    try:
        return Submitted(line.number, client.submit(pipeline, line.inputs))
    except StagecoachError as error:
        return Submitted(line.number, None, str(error))
    except Exception as error:  # not one of ours (a serialiser, the broker client): still this line's alone
        return Submitted(line.number, None, encodable(f"{type(error).__name__}: {error}"))


def wait_all(handles: list[JobHandle], timeout: float) -> list[JobResult | str]:
    """Each job's result (or why there is none), with a progress bar over completions."""
    results: list[JobResult | str] = []
    with Progress(transient=True, console=render.err, disable=not render.err.is_terminal) as progress:
        task = progress.add_task(f"waiting for {len(handles)} jobs", total=len(handles))
        for handle in handles:
            results.append(_wait(handle, timeout))
            progress.advance(task)
    return results


def _wait(handle: JobHandle, timeout: float) -> JobResult | str:
    """The job's result, or why there is none (one job's trouble never hides the others' results)."""
    try:
        return handle.get(timeout=timeout)
    except StagecoachError as error:
        return str(error)
    except Exception as error:
        return encodable(f"{type(error).__name__}: {error}")
