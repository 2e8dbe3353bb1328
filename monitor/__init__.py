"""Monitoring: the event consumer, its Redis store, traces, graphs, the HTTP server (JSON, Prometheus,
web page), timing statistics shared by `stagecoach eval` and the monitor, and QA evaluation.

Depends only on contracts.
"""
