"""Leases on running steps: a dead worker's job moves on in seconds, a live one is never disturbed.

Each stage step that a delivery claims holds a lease: its job's deadline in the watch index is
pushed one lease ahead, and the process's lease keeper renews it every third of a lease while the
step runs (as Temporal's activities heartbeat). A worker that dies (SIGKILL, OOM, a lost machine)
or a step whose message went back into a channel a Redis restart closed stops renewing, so the
deadline lapses within one lease and the watchdog re-dispatches the job from its checkpoint; the
claims keep every step once-only. A step that legitimately runs for minutes keeps its lease as long
as its worker lives, up to the step's hard time limit (past it, only a stuck call could still be
running, and the job is the watchdog's again).
"""

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from contracts.names import WATCH_KEY

log = logging.getLogger(__name__)


class LeaseKeeper:
    """One thread per process renewing the leases of the steps the process runs, in one round trip."""

    def __init__(self, client: redis.Redis, seconds: float) -> None:
        self.client = client
        self.seconds = seconds
        self._held: dict[int, tuple[str, float]] = {}  # token -> (job id, renew until)
        self._lock = threading.Lock()
        self._next = 0
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stagecoach-leases", daemon=True)
        self._thread.start()

    @contextmanager
    def held(self, job_id: str, until: float) -> Iterator[None]:
        """The job's lease renewed while the block runs (not past `until`, the step's hard limit)."""
        with self._lock:
            self._next += 1
            token = self._next
            self._held[token] = (job_id, until)
        try:
            yield
        finally:
            with self._lock:
                del self._held[token]

    def renew(self) -> int:
        """Push every held job's deadline one lease ahead (never back: another step of the job may have
        pushed it further; never for a job no longer watched: it ended). Returns how many were renewed."""
        now = time.time()
        with self._lock:
            leases = [(job_id, until) for job_id, until in self._held.values() if until > now]
        if not leases:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for job_id, until in leases:
            pipe.zadd(WATCH_KEY, {job_id: min(now + self.seconds, until)}, xx=True, gt=True)
        pipe.execute()
        return len(leases)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.seconds / 3)
            try:
                self.renew()
            except redis.RedisError as error:  # Redis restarting: the next renewal tries again
                log.warning("could not renew step leases: %s", error)


_keepers: dict[tuple[int, int], LeaseKeeper] = {}
_keepers_lock = threading.Lock()


def keeper(client: redis.Redis, seconds: float) -> LeaseKeeper:
    """This process's keeper for `client` (a forked pool child starts its own: threads do not survive a fork)."""
    key = (os.getpid(), id(client))
    with _keepers_lock:
        if key not in _keepers:
            _keepers[key] = LeaseKeeper(client, seconds)
        return _keepers[key]
