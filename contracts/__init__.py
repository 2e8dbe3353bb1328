"""Stagecoach contracts: the JSON shapes that travel between clients, routers and stage workers.

Pure pydantic, no Celery import: any component (or another language) can rely on these shapes.
"""
