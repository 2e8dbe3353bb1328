"""The Celery app instance workers serve: `celery -A workers.app worker -Q stage.<name>`."""

from workers.factory import create_runtime

runtime = create_runtime()
app = runtime.app
