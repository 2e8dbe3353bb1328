"""Memory: peak RSS (VmHWM) of each stage worker process after a load of `qa` jobs.

Thread-pool workers are one process each, so the peak covers every thread's program and LM.
Target: <= 300 MB per stage worker process.
"""

from pathlib import Path

from bench.harness import Bench, Ratio, Scale, ScenarioResult, Series, Stack, routing_worker, stage_workers

STAGES = ["key_terms", "answer"]
TARGET_MB = 300.0


def run(bench: Bench, scale: Scale) -> ScenarioResult:
    series = Series("peak RSS per stage worker", "MB")
    with bench.stack(0, [*stage_workers(STAGES, 4), routing_worker()]) as stack:
        for round_ in range(scale.rounds):
            _load(stack, scale.burst, round_)
            series.add_round([peak_rss_mb(stack.pid(f"stage-{s}")) for s in STAGES])
    return ScenarioResult("memory", "Peak RSS of one stage worker process (qa, 4 threads)",
                          {"jobs_per_round": scale.burst, "rounds": scale.rounds, "threads_per_worker": 4},
                          [series], [Ratio("peak RSS, MB", series, None, TARGET_MB)])


def _load(stack: Stack, jobs: int, round_: int) -> None:
    handles = [stack.client.submit("qa", {"question": f"Why is the Rhine busy? ({round_}/{j})"}) for j in range(jobs)]
    for handle in handles:
        handle.get(timeout=300)


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process from /proc (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")
