"""BM25 retrieval over a passage corpus, for the multi-hop retrieve stage.

A corpus is a list of passages (title + text) read from JSONL (`{"title": ..., "text": ...}` a
line) or built from every context paragraph of a HotPotQA file. The bm25s index is built once
and cached on disk under a key derived from the corpus content, so a changed corpus can never be
served a stale index; each process loads it once (`open_retriever` memoises) and shares it across
threads, because bm25s retrieval only reads the index.
"""

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import bm25s

from contracts.errors import StagecoachError
from contracts.jsonlines import object_line

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "STAGECOACH_RETRIEVAL_CACHE"
DEFAULT_CACHE = REPO_ROOT / ".stagecoach" / "bm25"
INDEX_FORMAT = "bm25s-en-stopwords-v1"  # part of the cache key: change it when tokenisation changes
CorpusFormat = Literal["jsonl", "hotpotqa"]

_lock = threading.Lock()


class CorpusError(StagecoachError):
    """The corpus is missing or malformed; names the file and, where known, the line."""


@dataclass(frozen=True)
class Passage:
    title: str
    text: str

    def render(self) -> str:
        return f"{self.title}: {self.text}"


class Retriever:
    """Top-k passages for a query; thread-safe for reads."""

    def __init__(self, passages: list[Passage], index: bm25s.BM25, digest: str) -> None:
        self.passages = passages
        self.index = index
        self.digest = digest

    def search(self, query: str, k: int) -> list[Passage]:
        tokens = _tokenize([query])
        if not tokens.vocab:  # a query of only stopwords or punctuation matches nothing
            return []
        k = min(k, len(self.passages))
        ids, scores = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        # a zero score shares no term with the query: padding, not a match
        return [self.passages[int(i)] for i, score in zip(ids[0], scores[0], strict=True) if score > 0]


def resolve_path(path: str, env_var: str | None = None) -> Path:
    """The corpus path: the env var when set, else `path`, relative paths taken from the repo root."""
    chosen = os.environ.get(env_var, "") if env_var else ""
    raw = Path(chosen or path).expanduser()
    return raw if raw.is_absolute() else (REPO_ROOT / raw).resolve()


def open_retriever(
    corpus: str, fmt: CorpusFormat = "jsonl", corpus_env: str | None = None, cache_dir: str | None = None
) -> Retriever:
    """The process-wide retriever for a corpus, built or loaded from the disk cache on first use."""
    path = resolve_path(corpus, corpus_env)
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else (0, 0)
    with _lock:
        return _cached_retriever(path, stamp, fmt, cache)


@lru_cache(maxsize=8)
def _cached_retriever(path: Path, stamp: tuple[int, int], fmt: CorpusFormat, cache: Path) -> Retriever:
    """One retriever per corpus file version (`stamp`: mtime and size, so an edited file is re-read)."""
    passages = read_corpus(path, fmt)
    digest = corpus_digest(passages)
    return Retriever(passages, _index(passages, cache / digest[:24]), digest)


def read_corpus(path: Path, fmt: CorpusFormat) -> list[Passage]:
    if not path.is_file():
        hint = " (set the corpus path in the stage options or its environment variable)"
        raise CorpusError(f"corpus file not found: {path}{hint}")
    readers = {"jsonl": read_jsonl_corpus, "hotpotqa": read_hotpotqa_corpus}
    if fmt not in readers:
        raise CorpusError(f"unknown corpus format '{fmt}'; use one of {sorted(readers)}")
    passages = readers[fmt](path)
    if not passages:
        raise CorpusError(f"corpus {path} holds no passages")
    return passages


def read_jsonl_corpus(path: Path) -> list[Passage]:
    """One `{"title": str, "text": str}` object a line; blank lines are skipped."""
    passages = []
    for number, record in _records(path):
        title, text = record.get("title"), record.get("text")
        if not isinstance(title, str) or not isinstance(text, str):
            raise CorpusError(f"{path}:{number}: a passage needs string fields 'title' and 'text'")
        passages.append(Passage(title, text))
    return passages


def read_hotpotqa_corpus(path: Path) -> list[Passage]:
    """Every context paragraph of a HotPotQA file (`context: [[title, [sentences]], ...]`), deduplicated."""
    seen: dict[tuple[str, str], Passage] = {}
    for number, record in _records(path):
        for item in _context_of(path, number, record):
            passage = Passage(str(item[0]), "".join(item[1]).strip())
            seen.setdefault((passage.title, passage.text), passage)
    return list(seen.values())


def _context_of(path: Path, number: int, record: dict[str, Any]) -> list[Any]:
    context = record.get("context")
    ok = isinstance(context, list) and all(isinstance(c, list) and len(c) == 2 for c in context)
    if not ok:
        raise CorpusError(f"{path}:{number}: field 'context' is not a list of [title, sentences] pairs")
    return context  # type: ignore[return-value]


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        out.append((number, object_line(path, number, line, CorpusError)))
    return out


def corpus_digest(passages: list[Passage]) -> str:
    """sha256 of the passages and the tokenisation scheme: the index cache key."""
    payload = json.dumps([INDEX_FORMAT, [[p.title, p.text] for p in passages]], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _index(passages: list[Passage], folder: Path) -> bm25s.BM25:
    if (folder / "params.index.json").exists():
        return bm25s.BM25.load(str(folder), show_progress=False)
    index = bm25s.BM25()
    index.index(_tokenize([p.render() for p in passages]), show_progress=False)
    _save_atomically(index, folder)
    return index


def _save_atomically(index: bm25s.BM25, folder: Path) -> None:
    """Write to a private folder then rename, so a concurrent reader never sees half an index."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    index.save(str(scratch), show_progress=False)
    try:
        scratch.rename(folder)
    except OSError:  # another process won the race; its index is identical
        shutil.rmtree(scratch, ignore_errors=True)


def _tokenize(texts: list[str]) -> Any:
    return bm25s.tokenize(texts, stopwords="en", show_progress=False)
