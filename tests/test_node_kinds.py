"""The table of node kinds and the tree helpers derived from the spec models, without workers."""

import os

from celery import Celery

from contracts.builder import Map, Pipeline, Sequential, Stage, SubPipeline, add
from contracts.catalog import iter_nodes, load_catalog
from contracts.specs import CHILD_FIELDS, NODE_MODELS, Limits, ParallelNode, StageNode, children
from routing.chords import limited
from routing.compile import Compiler
from routing.nodes import KINDS
from tests.services import ROOT

SHIPPED = load_catalog([ROOT / "pipelines", ROOT / "tests" / "pipelines"])


def test_every_node_model_has_exactly_one_kind_entry() -> None:
    modelled = {model.model_fields["kind"].default for model in NODE_MODELS}
    assert set(KINDS) == modelled == set(CHILD_FIELDS)


def test_child_fields_are_derived_from_the_models() -> None:
    assert CHILD_FIELDS["branch"] == {"router": "one", "branches": "dict"}
    assert CHILD_FIELDS["ensemble"] == {"members": "list"} and CHILD_FIELDS["parallel"] == {"members": "dict"}
    assert CHILD_FIELDS["stage"] == {}


def test_every_catalog_pipeline_compiles_with_the_table_alone() -> None:
    compiler = Compiler(Celery("compile-only", set_as_current=False), SHIPPED, KINDS)
    for spec in SHIPPED.pipelines.values():
        assert compiler.pipeline(spec) is not None, spec.name


def test_children_walk_every_node_of_every_shipped_pipeline() -> None:
    for spec in SHIPPED.pipelines.values():
        nodes = list(iter_nodes(spec.root))
        assert sum(len(children(n)) for n in nodes) == len(nodes) - 1, spec.name


def test_limited_bounds_every_stage_below_a_member_including_named_subpipelines() -> None:
    member = SubPipeline("qa", id="sub")
    bounded = limited(SHIPPED, member, 4.0)
    stages = [n for n in iter_nodes(bounded) if isinstance(n, StageNode)]
    assert [s.stage for s in stages] == ["key_terms", "answer"]
    assert all(s.time_limit == 4.0 and s.lm is not None and s.lm.timeout == 4.0 for s in stages)
    loop_member = SHIPPED.pipeline("patterns_loop").root
    assert all(s.time_limit == 4.0 for s in iter_nodes(limited(SHIPPED, loop_member, 4.0))
               if isinstance(s, StageNode))


def test_limited_keeps_a_bound_the_spec_set() -> None:
    stage = StageNode.model_validate({"stage": "answer", "time_limit": 1.5, "lm": {"timeout": 2}})
    bounded = limited(SHIPPED, stage, 9.0)
    assert isinstance(bounded, StageNode) and bounded.time_limit == 1.5 and bounded.lm and bounded.lm.timeout == 2


def test_a_stage_time_limit_becomes_celery_soft_and_hard_limits() -> None:
    compiler = Compiler(Celery("compile-only", set_as_current=False), SHIPPED, KINDS)
    sig = compiler.stage(StageNode(stage="answer", time_limit=3.0), "")
    assert (sig.options["soft_time_limit"], sig.options["time_limit"]) == (3.0, Limits.of(3.0).hard)


def test_add_inserts_a_stage_into_an_existing_pipeline() -> None:
    base = Pipeline("p", ["key_terms", "answer"], inputs={"question": "str"})
    grown = add(base, Stage("summarize", inputs={"document": "question"}), 1)
    assert [s.stage for s in grown.root.steps] == ["key_terms", "summarize", "answer"]  # type: ignore[union-attr]
    assert [s.stage for s in add(base, "headline").root.steps][-1] == "headline"  # type: ignore[union-attr]
    assert [s.stage for s in base.root.steps] == ["key_terms", "answer"]  # type: ignore[union-attr]
    single = Pipeline("q", Map("define", over="terms", item="term", collect={"definition": "d"}),
                      inputs={"terms": "list[str]"})
    assert [n.kind for n in add(single, "key_terms", 0).root.steps] == ["stage", "map"]  # type: ignore[union-attr]
    assert add(base, Sequential("answer"), -1).root.steps[1].kind == "sequence"  # type: ignore[union-attr]


def test_the_session_redis_is_private(redis_url: str) -> None:
    """Never a database of the Redis at 6379 (a user's data lives there) unless asked for."""
    if not os.environ.get("STAGECOACH_TEST_REDIS_URL"):
        assert ":6379/" not in redis_url


def test_shorthands_expand_inside_every_child_field() -> None:
    spec = Pipeline("p", {"kind": "parallel", "members": {"a": "key_terms", "b": ["summarize", "headline"]}},
                    inputs={"question": "str"})
    assert isinstance(spec.root, ParallelNode)
    assert [c.kind for c in children(spec.root)] == ["stage", "sequence"]
