"""`stagecoach up`: start the stack, show what runs where, stop all of it on Ctrl-C or SIGTERM."""

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli import render
from cli.inputs import InputError
from cli.stack import Service, Stack, redact, start_stack
from workers.settings import Settings, parse_autoscale

READY_SECONDS = 180.0


def parse_worker_counts(text: str) -> dict[str, int]:
    """`retrieve=3,synthesize=2` -> {"retrieve": 3, "synthesize": 2}; a bad item names itself."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        stage, sep, raw = item.partition("=")
        if not sep or not stage or not raw.strip().isdigit() or int(raw) < 1:
            raise InputError(f"--workers {item!r}: expected STAGE=N with N >= 1 (e.g. retrieve=3,synthesize=2)")
        counts[stage.strip()] = int(raw)
    return counts


def parse_autoscale_option(text: str) -> dict[str, tuple[int, int]]:
    """`key_terms=1..8` -> {"key_terms": (1, 8)}; a bad item names itself."""
    try:
        return parse_autoscale(text)
    except ValueError as error:
        raise InputError(f"--autoscale: {error}") from None


@contextmanager
def running_stack(settings: Settings, state_dir: Path, stop: threading.Event | None = None) -> Iterator[Stack]:
    """A started and ready stack, stopped on the way out whatever happens."""
    render.err.print(f"starting the stack (logs in {state_dir / 'logs'}) ...")
    stack = start_stack(settings, state_dir)
    try:
        stack.wait_ready(READY_SECONDS, stop)
        stack.write_state(state_dir / "stack.json")
        yield stack
    finally:
        render.err.print("stopping the stack ...")
        stack.stop()
        (state_dir / "stack.json").unlink(missing_ok=True)
        render.err.print("stack stopped")


def show(stack: Stack) -> None:
    rows = [(s.name, s.proc.pid, s.role, s.url, str(s.log)) for s in stack.services]
    render.out.print(render.stack_table(rows))
    render.out.print(f"broker: {redact(stack.broker_url)}   results: {redact(stack.settings.backend_url)}   "
                     f"flower: {stack.flower_url}   monitor: {stack.monitor_url}   LM: {stack.lm_url or 'configured'}",
                     highlight=False)
    token = f"token in {stack.api_token_file}" if stack.api_token_file else "token: STAGECOACH_API_ADMIN_TOKEN"
    render.out.print(f"HTTP API: {stack.api_url} ({stack.api_url}/docs; {token})", highlight=False)


@contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (handlers restored afterwards)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


RESTARTS_PER_MINUTE = 5  # a service dying more often than this is crash-looping: stop the stack instead


def serve_until_stopped(stack: Stack, stop: threading.Event) -> int:
    """Block until a stop signal (exit 0). A service that dies is restarted (and said so); Redis dying,
    or a service crash-looping, stops the stack (exit 1)."""
    while not stop.wait(1.0):
        for service in stack.dead():
            if not restart_dead(service):
                return 1
    return 0


def restart_dead(service: Service) -> bool:
    """Restart a dead service, telling the operator; False when it must not or should not be restarted."""
    recent = [t for t in service.restarts if t > time.time() - 60]
    render.err.print(f"[red]{service.name} exited (code {service.proc.returncode}); log {service.log}:[/]\n"
                     f"{service.log_tail(1500)}")
    if service.role == "redis" or len(recent) >= RESTARTS_PER_MINUTE:
        render.err.print(f"[red]not restarting {service.name}[/] "
                         f"({'the broker' if service.role == 'redis' else 'it keeps dying'}); stopping the stack")
        return False
    service.restart()
    render.err.print(f"[yellow]restarted {service.name}[/] (pid {service.proc.pid})", highlight=False)
    return True


def up(settings: Settings, state_dir: Path) -> int:
    with stop_signals() as stop, running_stack(settings, state_dir, stop) as stack:
        show(stack)
        render.out.print("[green]stack ready[/] - Ctrl-C stops all of it", highlight=False)
        return serve_until_stopped(stack, stop)
