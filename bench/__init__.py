"""Benchmarks: `python -m bench` (or `make bench`) runs every scenario in `SCENARIOS`.

Adding a scenario is one line here: its name and the module whose `run(bench, scale)` returns a
`bench.harness.ScenarioResult`.
"""

SCENARIOS: dict[str, str] = {
    "latency": "bench.latency",        # per-job latency of 2/3-stage sequences vs a bare Celery chain
    "throughput": "bench.throughput",  # LM-bound jobs/s vs the same program in-process
    "cpu": "bench.cpu",                # CPU-bound stage, 2 worker processes vs in-process
    "fanout": "bench.fanout",          # ensemble of 5, parallel of 3, map over 4 vs one member
    "memory": "bench.memory",          # peak RSS of one stage worker process
    "scaling": "bench.scaling",        # 1/2/4 worker processes on one stage queue
    "cache": "bench.cache",            # a job answered by the shared stage cache vs the same job cold
    "fusion": "bench.fusion",          # a three-stage chain fused into one task (or one LM call fewer too) vs unfused
    "api": "bench.api",                # POST /v1/jobs per second; latency the HTTP API adds per job vs the client
    "optimize": "bench.optimize",      # DSPy optimisers on the fleet vs in-process; a rerun's LM calls
    "answers": "bench.answers",        # the default local model's answers, each way of asking it (adapters)
    "scale": "bench.scale",            # bursts vs bare Celery at 0 ms, the monitor, Redis per job, backlog, curve
}
