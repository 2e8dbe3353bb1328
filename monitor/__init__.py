"""Monitoring: stage timing aggregates (and, later, the Celery event consumer). Depends only on contracts."""
