"""The runtime: what every process of a fleet shares, built once from settings and handed around.

Workers, routing tasks, the client and the CLI receive a `Runtime` explicitly; nothing is hung on
the Celery app or read from a global.
"""

from dataclasses import dataclass

from celery import Celery

from contracts.catalog import Catalog
from workers.jobs import JobStore
from workers.ledger import Ledger
from workers.settings import Settings


@dataclass(frozen=True)
class Runtime:
    app: Celery
    settings: Settings
    catalog: Catalog
    ledger: Ledger  # the one owner of a job's life: start, steps, end (workers/ledger.py)

    @property
    def jobs(self) -> JobStore:
        return self.ledger.jobs
