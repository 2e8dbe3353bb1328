"""A worker's container health check: `python -m workers.health NAME@HOST` exits 0 when it answers.

It pings the one named worker through the broker (Celery remote control), so it proves the worker is
alive and connected. It builds a bare Celery app from settings: no catalog, no DSPy, cheap to run
every minute.
"""

import sys

from celery import Celery

from workers.settings import Settings

PING_SECONDS = 10.0


def answers(worker: str, settings: Settings, timeout: float = PING_SECONDS) -> bool:
    app = Celery("stagecoach-health", broker=settings.broker_url)
    try:
        replies = app.control.ping(destination=[worker], timeout=timeout)
    finally:
        app.close()
    return any(worker in reply for reply in replies)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m workers.health WORKER_NAME@HOST", file=sys.stderr)
        return 2
    if answers(argv[0], Settings()):
        return 0
    print(f"worker {argv[0]} did not answer a ping within {PING_SECONDS:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
