"""The Celery app instance workers serve: `celery -A workers.app worker -Q stage.<name>`."""

from workers.factory import create_app

app = create_app()
