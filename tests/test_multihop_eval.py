"""`stagecoach eval` on real workers: scores recomputed from the jobs it ran, failures counted."""

import json
import subprocess
from pathlib import Path

import pytest

from cli.evaluate import evaluate
from monitor.evaluation import QAExample, load_examples, title_recall
from routing.client import Client
from tests.services import ROOT, worker_env

STAGECOACH = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "stagecoach")
QUESTIONS = ROOT / "examples" / "data" / "questions.jsonl"


def shown(text: str) -> str:
    """How the test LM quotes an input: the first 60 characters."""
    return text if len(text) <= 60 else text[:57] + "..."


def test_eval_command_reports_scores_latency_and_usage(client: Client, redis_url: str, lm_url: str) -> None:
    run = subprocess.run([STAGECOACH, "eval", "multihop", "--data", str(QUESTIONS), "--limit", "4", "--json"],
                         cwd=ROOT, env=worker_env(redis_url, lm_url), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    gold = load_examples(QUESTIONS, limit=4)
    assert (report["questions"], report["succeeded"], report["failed"]) == (4, 4, 0)
    recalls = []
    for item, example in zip(report["items"], gold, strict=True):
        job = client.handle(item["job_id"]).get(timeout=10)
        assert item["prediction"] == job.fields["final_answer"] == f"final_answer of <{shown(example.question)}>"
        recalls.append(title_recall(job.fields["retrieved_titles"], example.supporting_titles))
        assert item["title_recall"] == recalls[-1]
    assert report["title_recall"] == sum(recalls) / 4 > 0  # BM25 finds gold passages from the question words
    assert report["exact_match"] == 0.0  # the test LM echoes, it does not answer
    latency = report["stage_latency"]
    assert {name: s["count"] for name, s in latency.items()} == {"decompose": 4, "retrieve": 8, "synthesize": 4}
    assert all(s["min"] <= s["p50"] <= s["p95"] <= s["max"] for s in latency.values())
    assert report["job_latency"]["count"] == 4
    assert report["usage"]["retrieve"]["calls"] == 8
    assert report["total_usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in report["usage"].values())


def test_failed_jobs_score_zero_and_are_counted(client: Client) -> None:
    examples = [
        QAExample("ok", "Who taught the chief engineer of the Northwind Railway?", "Ada Vorn", ["Piet Lorne"]),
        QAExample("bad", "Who built it? [[lm:status=400]]", "nobody", ["Kellwick"]),
    ]
    report = evaluate(client, "multihop", examples, concurrency=1, timeout=90, show_progress=False)
    assert (report.succeeded, report.failed) == (1, 1)
    ok, bad = report.items
    assert bad.error is not None and "decompose" in bad.error and bad.title_recall == 0.0
    assert ok.error is None and ok.title_recall == 1.0  # "Piet Lorne" is retrieved
    assert report.title_recall == 0.5
    assert report.stage_latency["decompose"].count == 1  # only the job that ran contributes timings


def test_stage_stats_match_numpy_percentiles() -> None:
    import numpy as np

    from contracts.envelope import StageTiming
    from monitor.stats import stage_stats, summarize

    seconds = [0.5, 0.1, 2.0, 0.3, 0.9, 1.4, 0.2]
    timings = [StageTiming(node=f"n{i}", stage="s" if i % 2 else "t", identity="x@1", started_at=0.0, seconds=v)
               for i, v in enumerate(seconds)]
    stats = stage_stats(timings)
    assert list(stats) == ["t", "s"]
    odd = [v for i, v in enumerate(seconds) if i % 2]
    assert stats["s"].count == 3 and stats["s"].max == 1.4 and stats["s"].min == 0.1
    whole = summarize(seconds)
    assert whole.p50 == pytest.approx(float(np.percentile(seconds, 50)))
    assert whole.p95 == pytest.approx(float(np.percentile(seconds, 95)))
    assert stats["s"].mean == pytest.approx(sum(odd) / 3)
    with pytest.raises(ValueError, match="empty"):
        summarize([])
