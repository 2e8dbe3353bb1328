"""The HTTP API's cost: requests per second of `POST /v1/jobs`, and the latency it adds per job.

- latency: one 2-stage job at a time at a 0 ms LM, submit to result, through the API (`POST /v1/jobs`,
  then `GET .../result?wait=`, one keep-alive connection) and through the Python client the API itself
  calls; the ratio and the difference of the medians are what HTTP adds.
- submit rate: bursts of `POST /v1/jobs` from 8 threads (auth on, a bearer token checked per request),
  against `Client.submit` from 8 threads in this process: submissions per second (the jobs run meanwhile;
  each burst's jobs finish before the next burst).
"""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    Bench,
    Ratio,
    Scale,
    ScenarioResult,
    Series,
    Stack,
    interleave,
    routing_worker,
    stage_workers,
    timed,
    timed_job,
)
from cli.fleet import ROOT, free_port, stop_process, wait_until

THREADS = 8
TOKEN = "sc_bench-" + uuid.uuid4().hex


@contextmanager
def api_server(stack: Stack, logdir: Path) -> Iterator[str]:
    """`stagecoach api` on a free port, on the stack's Redis and catalog, auth on, no rate limit."""
    port = free_port()
    env = {**stack.fleet.env, "STAGECOACH_API_PORT": str(port), "STAGECOACH_API_ADMIN_TOKEN": TOKEN,
           "STAGECOACH_API_RATE_PER_MINUTE": "0", "STAGECOACH_PLUGINS": "[]"}  # the bare-chain tasks: workers only
    url = f"http://127.0.0.1:{port}"
    with (logdir / "api.log").open("wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("stagecoach")), "api"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is None and _up(url), 60, "stagecoach api")
            yield url
        finally:
            stop_process(proc)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    plan = [*stage_workers(["key_terms", "answer"], 4), routing_worker()]
    with bench.stack(0, plan) as stack, api_server(stack, bench.logdir) as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
        measures = {
            "latency via HTTP API": lambda r: [_via_http(http, r * 1000 + j) * 1000 for j in range(scale.jobs)],
            "latency via Python client": lambda r: [timed_job(stack, "qa", _inputs(r * 1000 + j)) * 1000
                                                    for j in range(scale.jobs)],
            "POST /v1/jobs per second": lambda r: [_burst(lambda i: _post(http, i), stack, scale.burst, r)],
            "Client.submit per second": lambda r: [_burst(lambda i: _submit(stack, i), stack, scale.burst, r)],
        }
        for index in range(scale.warmup):
            for name, measure in measures.items():
                if "latency" in name:
                    measure(-1 - index)
        rounds = interleave(scale.rounds, measures)
    series = {name: Series(name, "ms" if "latency" in name else "req/s", samples) for name, samples in rounds.items()}
    latency_http, latency_client = series["latency via HTTP API"], series["latency via Python client"]
    ratios = [Ratio("latency HTTP API / Python client", latency_http, latency_client),
              Ratio("POST /v1/jobs per second", series["POST /v1/jobs per second"], None, better="higher"),
              Ratio("POST /v1/jobs / Client.submit (submissions per second)", series["POST /v1/jobs per second"],
                    series["Client.submit per second"], better="higher")]
    added = latency_http.median - latency_client.median
    return ScenarioResult("api", "HTTP API: POST /v1/jobs per second, latency added per job vs the Python client",
                          {"lm_latency_ms": 0, "jobs_per_round": scale.jobs, "burst": scale.burst,
                           "threads": THREADS, "rounds": scale.rounds, "auth": "bearer token"},
                          list(series.values()), ratios,
                          [f"latency added per job by the HTTP API (median difference): {added:.1f} ms"])


def _inputs(index: int) -> dict[str, Any]:
    return {"question": f"What moves barges on the Rhine? (api job {index} {os.getpid()})"}


def _via_http(http: httpx.Client, index: int) -> float:
    def job() -> None:
        sent = http.post("/v1/jobs", json={"pipeline": "qa", "inputs": _inputs(index)})
        sent.raise_for_status()
        done = http.get(f"/v1/jobs/{sent.json()['job_id']}/result", params={"wait": 60})
        if done.status_code != 200 or done.json()["state"] != "succeeded":
            raise RuntimeError(f"job via the API did not succeed: {done.status_code} {done.text[:300]}")
    return timed(job)


def _post(http: httpx.Client, index: int) -> str:
    sent = http.post("/v1/jobs", json={"pipeline": "qa", "inputs": _inputs(index)})
    if sent.status_code != 202:
        raise RuntimeError(f"POST /v1/jobs: {sent.status_code} {sent.text[:300]}")
    return str(sent.json()["job_id"])


def _submit(stack: Stack, index: int) -> str:
    return stack.client.submit("qa", _inputs(index)).id


def _burst(send: Any, stack: Stack, size: int, round_: int) -> float:
    """Submissions per second of `size` jobs from THREADS threads; then every job of the burst is awaited."""
    base = 100_000 + round_ * size
    sent: list[str] = []
    with ThreadPoolExecutor(THREADS) as pool:
        seconds = timed(lambda: sent.extend(pool.map(send, range(base, base + size))))
    for job_id in sent:
        stack.client.handle(job_id).get(timeout=120)
    return size / seconds
