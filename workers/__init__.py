"""Stage workers: the Celery app, one task per stage, the LM configuration and the stage runner."""
