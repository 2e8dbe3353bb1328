"""Optimisation on the fleet: DSPy's own optimisers, run in the client, over a proxy of the pipeline whose
every call is one job on the stage workers (docs/optimize.md).

Layering: this package sits above `routing` (it submits jobs with the Python client) and beside `cli`.
"""
