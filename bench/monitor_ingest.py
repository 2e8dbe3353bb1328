"""How many stage calls per second one monitor process counts (not a test).

Starts its own Redis server and writes to the fleet's event stream what the workers write for N stage
calls (two-stage jobs: per job its JobQueued, per call StageStarted and StageOutcome, per job JobFinished,
every tenth call an error), then times one consumer (monitor/consumer.py, the monitor's own reading
loop: XREADGROUP batches, one atomic commit with the XACK each) counting the backlog, and checks the
counts are exact. Prints events/s and stage calls/s measured in this run; compare with the stage call
rate a fleet makes.

    python -m bench.monitor_ingest [--calls 20000] [--batch 500]
"""

import argparse
import time
from dataclasses import dataclass
from typing import Any

import redis

from cli.fleet import private_redis
from contracts.connections import redis_client
from contracts.events import JobFinished, JobQueued, StagecoachEvent, StageOutcome, StageStarted, event_name
from contracts.names import EVENTS_STREAM
from monitor.consumer import Consumer
from monitor.settings import MonitorSettings
from monitor.store import Store

STAGES = ("key_terms", "answer")


def job_events(job: int, now: float) -> list[StagecoachEvent]:
    """One `qa`-shaped job's events, as the ledger appends them to the fleet stream."""
    job_id = f"job-{job}"
    common: dict[str, Any] = {"job_id": job_id, "pipeline": "qa"}
    events: list[StagecoachEvent] = [JobQueued(**common, at=now, door="client")]
    for step, stage in enumerate(STAGES):
        call = job * len(STAGES) + step
        events.append(StageStarted(**common, at=now + step * 0.1, stage=stage, node=stage, worker="w@h",
                                   waited=0.002, first=step == 0))
        events.append(StageOutcome(**common, at=now + step * 0.1, stage=stage, node=stage,
                                   outcome="ok" if call % 10 else "error", kind="lm", message="boom",
                                   seconds=0.1 + (call % 7) / 100, prompt_tokens=100, completion_tokens=20,
                                   input_bytes=80, output_bytes=60, inputs='{"question": "why?"}',
                                   outputs='{"answer": "because"}', elapsed=0.1, worker="w@h"))
    events.append(JobFinished(**common, at=now + 0.25, state="succeeded", ending="succeeded", seconds=0.25,
                              submitted_at=now, answer='{"answer": "because"}'))
    return events


@dataclass
class Ingest:
    calls: int
    events: int
    seconds: float
    counted_runs: int

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds

    def line(self) -> str:
        return (f"{self.events} events ({self.calls} stage calls, {self.counted_runs} counted) in {self.seconds:.2f} s:"
                f" {self.events / self.seconds:.0f} events/s, {self.calls_per_second:.0f} stage calls/s")


def fill(client: redis.Redis, calls: int) -> int:
    """The stream holding `calls` stage calls' events; returns the number of events."""
    now, written = time.time(), 0
    pipe = client.pipeline(transaction=False)
    for job in range(calls // len(STAGES)):
        for event in job_events(job, now):
            pipe.xadd(EVENTS_STREAM, {"type": event_name(event), "data": event.model_dump_json()})
            written += 1
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    return written


def measure(url: str, calls: int, batch: int = 500) -> Ingest:
    """One consumer counting a backlog of `calls` stage calls on a fresh Redis at `url`."""
    client = redis_client(url)
    client.flushdb()
    events = fill(client, calls)
    consumer = Consumer.connect(MonitorSettings(broker_url=url, batch=batch, consumer="bench"))
    started = time.perf_counter()
    counted = consumer.drain()
    seconds = time.perf_counter() - started
    if counted != events:
        raise RuntimeError(f"the consumer counted {counted} events of {events}")
    runs = sum(f.runs for f in Store.connect(MonitorSettings(broker_url=url)).report().stages)
    if runs != calls:
        raise RuntimeError(f"the store counts {runs} stage calls of {calls}")
    return Ingest(calls, events, seconds, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    with private_redis() as url:
        print(measure(url, args.calls, args.batch).line())


if __name__ == "__main__":
    main()
