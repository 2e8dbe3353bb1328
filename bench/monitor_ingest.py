"""How many events per second the monitor's consumer records (not a test).

Starts its own Redis server and feeds the consumer the events one stage call produces (task-sent,
task-received, task-started, the stage outcome, task-succeeded) for N calls, the way Celery's
receiver hands them over, then reads the report back. Prints events/s and stage calls/s measured
in this run; compare with the stage call rate a deployment sees.

    python -m bench.monitor_ingest [--calls 2000]
"""

import argparse
import time
from typing import Any

from celery import Celery

from cli.fleet import private_redis
from contracts.events import StageOutcome
from contracts.names import STAGE_OUTCOME_EVENT, stage_task
from monitor.consumer import Consumer
from monitor.settings import MonitorSettings
from monitor.store import Store


def call_events(i: int, now: float) -> list[dict[str, Any]]:
    uuid, job = f"task-{i}", f"job-{i // 3}"
    common = {"uuid": uuid, "root_id": job}
    outcome = StageOutcome(stage="answer", pipeline="qa", job_id=job, node="answer", at=now + 0.1,
                           outcome="ok" if i % 10 else "error", kind="lm", message="boom",
                           seconds=0.1 + (i % 7) / 100, prompt_tokens=100, completion_tokens=20, input_bytes=80,
                           output_bytes=60, inputs="{}", outputs="{}")
    return [
        {"type": "task-sent", "name": stage_task("answer"), "timestamp": now, **common},
        {"type": "task-received", "name": stage_task("answer"), "timestamp": now + 0.001, "hostname": "w@h",
         **common},
        {"type": "task-started", "timestamp": now + 0.002, "hostname": "w@h", **common},
        {"type": STAGE_OUTCOME_EVENT, "timestamp": now + 0.1, **outcome.payload(), **common},
        {"type": "task-succeeded", "timestamp": now + 0.101, "runtime": 0.1, "hostname": "w@h", **common},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with private_redis() as url:
        consumer = Consumer(Celery("bench", broker=url), Store.connect(MonitorSettings(broker_url=url)))
        events = [e for i in range(args.calls) for e in call_events(i, time.time())]
        started = time.perf_counter()
        for event in events:
            consumer.handle(event)
        seconds = time.perf_counter() - started
        runs = consumer.store.report().stages[0].runs
    print(f"{len(events)} events ({args.calls} stage calls, {runs} counted) in {seconds:.2f} s: "
          f"{len(events) / seconds:.0f} events/s, {args.calls / seconds:.0f} stage calls/s")


if __name__ == "__main__":
    main()
