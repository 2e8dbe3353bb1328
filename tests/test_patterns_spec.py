"""Pattern specs without workers: the builder equals the YAML, bad specs are rejected at load."""

from pathlib import Path

import pytest
import yaml

from contracts.builder import (
    Adaptive,
    Branch,
    Hierarchical,
    Loop,
    Map,
    Pipeline,
    Sequential,
    Stage,
    SubPipeline,
    Until,
    When,
)
from contracts.catalog import MAX_DEPTH, Catalog, load_catalog
from contracts.errors import SpecError
from contracts.specs import LoopNode, PipelineSpec
from routing.nodes.adaptive import analyse
from routing.nodes.loop import stop_reason
from routing.nodes.runtime import normalise_choice
from tests.services import ROOT

PIPELINES = ROOT / "pipelines"


@pytest.fixture(scope="module")
def shipped() -> Catalog:
    return load_catalog([PIPELINES])


def _load(tmp_path: Path, doc: dict[str, object]) -> Catalog:
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(doc))
    return load_catalog([PIPELINES, tmp_path / "extra.yaml"])


def _described(spec: PipelineSpec, shipped: Catalog) -> PipelineSpec:
    """The builder's spec with the YAML's description and example (prose, not structure)."""
    source = shipped.pipeline(spec.name)
    return spec.model_copy(update={"description": source.description, "example": source.example})


# --- the builder builds what the YAML says --------------------------------------------------------

def test_builder_map_equals_yaml(shipped: Catalog) -> None:
    spec = Pipeline(
        "patterns_map",
        Sequential("key_terms", Map("define", over="key_terms", item="term", collect={"definition": "definitions"},
                                    max_fanout=8, overflow="truncate", id="terms")),
        inputs={"question": {"type": "str", "description": "the question whose terms to define"}},
        outputs=["key_terms", "definitions"],
    )
    assert _described(spec, shipped) == shipped.pipeline("patterns_map")


def test_builder_branch_equals_yaml(shipped: Catalog) -> None:
    spec = Pipeline(
        "patterns_branch",
        Branch("task_type", {"multiple_choice": SubPipeline("qa"), "short_answer": "short_answer", "essay": "essay"},
               router="classify_task", id="route"),
        inputs={"question": {"type": "str", "description": "the question to answer"}},
        outputs=["task_type", "answer"],
    )
    assert _described(spec, shipped) == shipped.pipeline("patterns_branch")


def test_builder_loop_equals_yaml(shipped: Catalog) -> None:
    spec = Pipeline(
        "patterns_loop",
        [
            Stage("short_answer", outputs={"answer": "draft"}),
            Loop([Stage("refine", outputs={"draft_next": "draft"}), "score_draft"], until=Until("quality", 0.6),
                 patience=2, epsilon=0.001, max_iterations=6, id="refine"),
        ],
        inputs={"question": {"type": "str", "description": "the question to answer"}},
        outputs=["draft", "quality", "refine_converged", "refine_iterations"],
    )
    assert _described(spec, shipped) == shipped.pipeline("patterns_loop")


def test_builder_adaptive_equals_yaml(shipped: Catalog) -> None:
    spec = Pipeline(
        "patterns_adaptive",
        Adaptive(
            "question",
            {
                "quick": "short_answer",
                "summary": Stage("summarize", inputs={"document": "question"}, outputs={"summary": "answer"}),
                "deliberate": [SubPipeline("patterns_map"), "essay"],
            },
            rules={"question": "quick", "statement": "summary", "complex_reasoning": "deliberate"},
            default="quick",
            id="adapt",
        ),
        inputs={"question": {"type": "str", "description": "a question or a statement"}},
        outputs=["answer"],
    )
    assert _described(spec, shipped) == shipped.pipeline("patterns_adaptive")


def test_builder_hierarchical_equals_structure_file(shipped: Catalog) -> None:
    spec = Hierarchical(
        "patterns_hierarchical",
        inputs={"question": {"type": "str", "description": "the question to study and answer"}},
        outputs=["key_terms", "definitions", "task_type", "answer"],
        modules={"terms": "key_terms", "define": "define", "classify": "classify_task", "short": "short_answer",
                 "long": "essay"},
        pipelines={
            "main": ["study", "respond"],
            "study": ["terms", Map("define", over="key_terms", item="term", collect={"definition": "definitions"},
                                   id="glossary")],
            "respond": ["by_type"],
        },
        conditionals={"by_type": When("task_type", {"essay": "long", "short_answer": "short",
                                                    "multiple_choice": SubPipeline("qa")},
                                      router="classify", default="short_answer")},
    )
    assert _described(spec, shipped) == shipped.pipeline("patterns_hierarchical")
    assert spec.root.kind == "sequence"
    assert [step.id for step in spec.root.steps] == ["study", "respond"]


def test_a_different_builder_spec_is_not_equal(shipped: Catalog) -> None:
    spec = Pipeline("patterns_map", Sequential("key_terms", Map("define", over="key_terms", item="term",
                                                                collect={"definition": "definitions"}, id="terms")),
                    inputs={"question": {"type": "str", "description": "the question whose terms to define"}},
                    outputs=["key_terms", "definitions"])
    assert _described(spec, shipped) != shipped.pipeline("patterns_map")  # max_fanout and overflow differ


# --- bad specs are rejected when they load --------------------------------------------------------

def _pipeline(name: str, root: object) -> dict[str, object]:
    return {"name": name, "inputs": {"question": "str"}, "root": root}


def test_branch_default_must_be_a_branch(tmp_path: Path) -> None:
    root = {"kind": "branch", "field": "x", "branches": {"a": "short_answer"}, "default": "b"}
    with pytest.raises(SpecError, match="default 'b' is not a branch; branches: a"):
        _load(tmp_path, {"pipeline": _pipeline("bad", root)})


def test_loop_patience_needs_a_score(tmp_path: Path) -> None:
    root = {"kind": "loop", "body": "short_answer", "patience": 2}
    with pytest.raises(SpecError, match="patience needs a score"):
        _load(tmp_path, {"pipeline": _pipeline("bad", root)})


def test_adaptive_rules_name_structures(tmp_path: Path) -> None:
    root = {"kind": "adaptive", "text_field": "question", "structures": {"quick": "short_answer"},
            "rules": {"question": "slow"}}
    with pytest.raises(SpecError, match="question -> 'slow' is not a structure; structures: quick"):
        _load(tmp_path, {"pipeline": _pipeline("bad", root)})


def test_subpipeline_cycle_is_rejected(tmp_path: Path) -> None:
    doc = {"pipelines": [
        _pipeline("ping", ["short_answer", {"kind": "subpipeline", "pipeline": "pong"}]),
        _pipeline("pong", {"kind": "branch", "field": "x", "branches": {"a": {"kind": "subpipeline",
                                                                              "pipeline": "ping"}}}),
    ]}
    with pytest.raises(SpecError, match="sub-pipeline cycle: ping -> pong -> ping"):
        _load(tmp_path, doc)


def test_named_subpipelines_too_deep_are_rejected(tmp_path: Path) -> None:
    pipelines = [_pipeline(f"level{i}", {"kind": "subpipeline", "pipeline": f"level{i + 1}"})
                 for i in range(MAX_DEPTH + 1)]
    pipelines.append(_pipeline(f"level{MAX_DEPTH + 1}", "short_answer"))
    with pytest.raises(SpecError, match=f"nest deeper than {MAX_DEPTH}"):
        _load(tmp_path, {"pipelines": pipelines})


def test_inline_subpipelines_count_towards_depth(tmp_path: Path) -> None:
    node: object = "short_answer"
    for _ in range(MAX_DEPTH + 1):
        node = {"kind": "subpipeline", "node": node}
    with pytest.raises(SpecError, match=r"nest deeper than 8: deep -> \(inline\)"):
        _load(tmp_path, {"pipeline": _pipeline("deep", node)})


def test_depth_at_the_limit_loads(tmp_path: Path) -> None:
    node: object = "short_answer"
    for _ in range(MAX_DEPTH - 1):
        node = {"kind": "subpipeline", "node": node}
    assert "deep" in _load(tmp_path, {"pipeline": _pipeline("deep", node)}).pipelines


def _structure(**sections: object) -> dict[str, object]:
    return {"structure": {"name": "s", "inputs": {"question": "str"}, "modules": {"short": "short_answer"},
                          **sections}}


def test_structure_cycle_is_rejected(tmp_path: Path) -> None:
    doc = _structure(pipelines={"main": ["a"], "a": ["short", "b"], "b": ["c"]},
                     conditionals={"c": {"field": "x", "branches": {"y": "a"}}})
    with pytest.raises(SpecError, match="structure 's': cycle: main -> a -> b -> c -> a"):
        _load(tmp_path, doc)


def test_structure_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    doc = _structure(pipelines={"main": ["short", "missing"]})
    with pytest.raises(SpecError, match="unknown name 'missing' in main; known: main, short"):
        _load(tmp_path, doc)


def test_structure_name_defined_twice(tmp_path: Path) -> None:
    doc = _structure(pipelines={"main": ["short"], "short": ["short"]})
    with pytest.raises(SpecError, match="name 'short' is defined in both modules and pipelines"):
        _load(tmp_path, doc)


def test_structure_too_deep(tmp_path: Path) -> None:
    chain = {f"p{i}": [f"p{i + 1}"] for i in range(MAX_DEPTH + 2)}
    doc = _structure(pipelines={"main": ["p0"], **chain, f"p{MAX_DEPTH + 2}": ["short"]})
    with pytest.raises(SpecError, match=f"nesting deeper than {MAX_DEPTH}"):
        _load(tmp_path, doc)


def test_unknown_top_level_key_names_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"unknown top-level keys \['structurs'\]; use .*structure"):
        _load(tmp_path, {"structurs": {}})


# --- decisions as pure functions ------------------------------------------------------------------

def test_normalise_choice() -> None:
    assert normalise_choice("  Short-Answer ") == "short_answer"
    assert normalise_choice("MULTIPLE choice") == "multiple_choice"
    assert normalise_choice(3) == "3"


def test_analysis_types() -> None:
    assert analyse("What is the capital of France?")["type"] == "question"
    assert analyse("how tides work")["type"] == "question"
    assert analyse("The Rhine flows into the North Sea.")["type"] == "statement"
    deep = analyse("Why did Rome fall, and how do economic causes compare with military pressure?")
    assert deep["type"] == "complex_reasoning"
    assert deep["reasoning_terms"] == 4
    assert deep["words"] == 13


def test_stop_reasons() -> None:
    loop = LoopNode.model_validate({"body": {"kind": "stage", "stage": "x"}, "until": {"field": "q", "threshold": 0.8},
                                    "patience": 2, "epsilon": 0.01, "max_iterations": 6})
    assert stop_reason(loop, [0.5]) is None
    assert stop_reason(loop, [0.5, 0.9]) == "threshold"
    assert stop_reason(loop, [0.5, 0.505, 0.51]) == "plateau"
    assert stop_reason(loop, [0.5, 0.6, 0.605]) is None
    assert stop_reason(loop, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == "max_iterations"
    below = loop.model_copy(update={"until": loop.until.model_copy(update={"direction": "below"})})  # type: ignore[union-attr]
    assert stop_reason(below, [0.9, 0.7]) == "threshold"
    assert stop_reason(below, [0.9, 0.895, 0.9]) == "plateau"
