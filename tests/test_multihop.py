"""The multi-hop QA pipeline on real workers, its retrieval, and HotPotQA scoring."""

import json
from pathlib import Path

import pytest

from contracts.specs import StageSpec
from examples.retrieval import CorpusError, Passage, open_retriever, read_hotpotqa_corpus
from monitor.evaluation import exact_match, load_examples, normalize_answer, title_recall, token_f1
from routing.client import Client
from workers.errors import PermanentStageError
from workers.settings import LMSettings
from workers.stage import StageRunner

ROOT = Path(__file__).resolve().parents[1]
DEMO_CORPUS = ROOT / "examples" / "data" / "corpus.jsonl"
QUESTION = "In which city was the engineer who designed the Marrow Bridge born?"


def demo_titles() -> set[str]:
    return {json.loads(line)["title"] for line in DEMO_CORPUS.read_text().splitlines() if line.strip()}


def test_multihop_answers_through_three_stage_queues(client: Client) -> None:
    result = client.submit("multihop", {"question": QUESTION}).get(timeout=90)
    assert result.state == "succeeded", result.error
    subs = result.answer["sub_questions"]
    assert subs == [f"sub_questions {i} of <{QUESTION[:57]}...>" for i in (1, 2)]
    assert result.answer["question"] == QUESTION
    assert result.answer["retrieved_facts"] == [f"retrieved_info of <{s[:57]}...>" for s in subs]
    assert result.answer["final_answer"] == f"final_answer of <{QUESTION[:57]}...>"
    titles = result.answer["retrieved_titles"]
    assert len(titles) == 2 and all(len(t) == 3 for t in titles)
    assert "Marrow Bridge" in titles[0] and set(titles[0]) <= demo_titles()
    assert [t.node for t in result.timings] == ["decompose", "hops[0]/retrieve", "hops[1]/retrieve", "synthesize"]
    workers = {t.stage: t.worker.split("@")[0] for t in result.timings}
    assert workers == {s: f"stage-{s}" for s in ("decompose", "retrieve", "synthesize")}
    assert result.usage["retrieve"].prompt_tokens > result.usage["decompose"].prompt_tokens  # passages in prompt


def test_hotpotqa_pipeline_retrieves_from_the_shared_slice(client: Client, hotpotqa: Path) -> None:
    example = load_examples(hotpotqa, limit=1)[0]
    result = client.submit("multihop_hotpotqa", {"question": example.question}).get(timeout=90)
    assert result.state == "succeeded", result.error
    corpus_titles = {p.title for p in read_hotpotqa_corpus(hotpotqa)}
    retrieved = {t for hop in result.answer["retrieved_titles"] for t in hop}
    assert retrieved and retrieved <= corpus_titles
    assert {t.stage for t in result.timings} == {"decompose", "retrieve_hotpotqa", "synthesize"}
    retriever = open_retriever(str(hotpotqa), "hotpotqa")
    expected = [[p.title for p in retriever.search(sub, 3)] for sub in result.answer["sub_questions"]]
    assert result.answer["retrieved_titles"] == expected


def test_hotpotqa_corpus_is_every_context_paragraph(hotpotqa: Path) -> None:
    passages = read_hotpotqa_corpus(hotpotqa)
    first = json.loads(hotpotqa.read_text().splitlines()[0])
    title, sentences = first["context"][0]
    assert Passage(title, "".join(sentences).strip()) in passages
    assert 1900 <= len(passages) <= 2000  # 200 questions x 10 paragraphs, some shared


def test_index_is_cached_on_disk_by_corpus_digest(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(DEMO_CORPUS.read_text())
    first = open_retriever(str(corpus), cache_dir=str(tmp_path / "cache"))
    assert first.search("Marrow Bridge designer", 2)[0].title == "Marrow Bridge"
    assert (tmp_path / "cache" / first.digest[:24] / "params.index.json").exists()
    corpus.write_text(DEMO_CORPUS.read_text().splitlines()[0] + "\n")
    changed = open_retriever(str(corpus), cache_dir=str(tmp_path / "cache"))  # new content: new key
    assert changed.digest != first.digest and len(changed.passages) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.digest[:24], changed.digest[:24]])
    assert first.search("the of and", 3) == []


def test_missing_corpus_is_a_clear_permanent_stage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere.jsonl"
    monkeypatch.setenv("STAGECOACH_HOTPOTQA_PATH", str(missing))
    spec = StageSpec(name="retrieve_hotpotqa", module="examples.multihop:RetrieveStage",
                     options={"corpus": "unused.jsonl", "corpus_env": "STAGECOACH_HOTPOTQA_PATH",
                              "format": "hotpotqa"},
                     inputs={"sub_question": "str"}, outputs={"retrieved_info": "str", "titles": "list[str]"})
    runner = StageRunner(spec, LMSettings(model="openai/test-lm", api_base="http://127.0.0.1:9/v1"))
    with pytest.raises(PermanentStageError, match=f"corpus file not found: {missing}"):
        runner.run({"sub_question": "who?"})


def test_malformed_corpus_line_is_named(tmp_path: Path) -> None:
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"title": "A", "text": "ok"}\n{"title": "B"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: a passage needs string fields 'title' and 'text'"):
        open_retriever(str(corpus), cache_dir=str(tmp_path / "cache"))


def test_hotpotqa_answer_scoring() -> None:
    assert normalize_answer("The  Rush!") == "rush"
    assert exact_match("the Rush", "Rush") == 1.0
    assert token_f1("Rush band", "Rush") == pytest.approx(2 / 3)
    assert token_f1("no", "yes") == 0.0 and token_f1("yes", "yes") == 1.0
    assert token_f1("yes it is", "yes") == 0.0  # yes/no answers must match exactly
    assert title_recall([["A", "B"], ["C"]], ["C", "D"]) == 0.5


def test_index_loaded_from_cache_ranks_like_a_fresh_one(tmp_path: Path, hotpotqa: Path) -> None:
    from examples.retrieval import Retriever, _index

    passages = read_hotpotqa_corpus(hotpotqa)
    fresh = Retriever(passages, _index(passages, tmp_path / "index"), "")
    assert (tmp_path / "index" / "vocab.index.json").exists()
    loaded = Retriever(passages, _index(passages, tmp_path / "index"), "")
    for example in load_examples(hotpotqa, limit=50):
        assert fresh.search(example.question, 5) == loaded.search(example.question, 5)
