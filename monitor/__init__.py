"""Monitoring: timing statistics shared by `stagecoach eval` and the monitor, and QA evaluation.

Depends only on contracts.
"""
