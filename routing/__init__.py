"""Routing: compile pipeline specs to Celery canvas, the routing tasks, and the Python client."""
