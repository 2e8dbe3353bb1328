"""Stage and pipeline specifications: pipelines are data, compiled to Celery canvas by `routing`.

A pipeline's `root` is a tree of nodes, one pydantic model per node kind (`NODE_MODELS`). How each
kind runs (compiled up front, decided by a routing task at run time, or both) is `routing`'s
business: its table of node kinds (`routing.nodes.KINDS`) has one entry per model here. Which
fields of a node hold child nodes is derived from the models' annotations once (`CHILD_FIELDS`),
so walking, normalising and rewriting trees never lists child keys by hand.
"""

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

from contracts.fields import Fields
from contracts.webhooks import Webhook


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LMOverride(Model):
    """Per-stage or per-node LM settings that replace the worker's defaults."""

    model: str | None = None
    api_base: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    rollout_id: int | None = None
    timeout: float | None = Field(None, gt=0, description="seconds an LM HTTP call may take")


class RetryPolicy(Model):
    max_retries: int = Field(3, ge=0, le=20)
    backoff_seconds: float = Field(1.0, ge=0)
    backoff_max_seconds: float = Field(30.0, ge=0)


def _version_text(value: Any) -> Any:
    """`version: 2` in YAML is an int; versions are names, so it reads as "2"."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# letters, digits, `_`, `.`, `-`: safe inside Celery task names, queue names and Redis keys
Version = Annotated[str, BeforeValidator(_version_text), StringConstraints(pattern=r"^[A-Za-z0-9_.\-]+$")]


class CachePolicy(Model):
    """How the fleet-wide stage cache treats a stage (workers/cache.py)."""

    enabled: bool = Field(True, description="serve repeated calls from the shared cache")
    sampled: bool = Field(False, description="cache even when sampling at temperature > 0")
    ttl: int | None = Field(None, gt=0, description="seconds an entry lives; default: the cache setting")


class OnError(Model):
    """What a stage does once its retries are spent (or the error is permanent).

    `fail`: the job fails (unless the node is `critical: false`: the error is recorded and the job
    goes on); `fallback`: the stage's outputs become `value` (checked against the output contract)
    or what the stage named `stage` produces from the same state; `skip`: the error is recorded and
    the job goes on without the stage's outputs. Every outcome is in the job's errors and trail.
    """

    strategy: Literal["fail", "fallback", "skip"] = "fail"
    value: dict[str, Any] | None = Field(None, description="fallback: fixed output values")
    stage: str | None = Field(None, description="fallback: a stage run in place of the failed one")

    @model_validator(mode="after")
    def _fallback_has_a_source(self) -> "OnError":
        if self.strategy == "fallback" and (self.value is None) == (self.stage is None):
            raise ValueError("on_error 'fallback' needs exactly one of 'value' (fixed outputs) or 'stage'")
        if self.strategy != "fallback" and (self.value is not None or self.stage is not None):
            raise ValueError(f"on_error '{self.strategy}' takes no 'value' or 'stage' (only 'fallback' does)")
        return self


class ScaleSpec(Model):
    """How a cluster scales the stage's worker Deployment on the length of its queue (`stagecoach k8s` renders
    it as a KEDA ScaledObject). `min: 0` lets an idle stage cost nothing: the first job then waits for a pod
    to start (scheduling, image pull, imports, catalog load: tens of seconds; docs/deploy.md)."""

    min: int = Field(1, ge=0, description="replicas kept when the queue is empty (0: scale to zero, cold start)")
    max: int = Field(10, ge=1, description="replicas at most")
    per_replica: int | None = Field(
        None, gt=0, description="waiting messages one replica is worth (KEDA's listLength); default: the worker's "
                                "concurrency, so a new replica is added once every slot has a message waiting")

    @model_validator(mode="after")
    def _min_within_max(self) -> "ScaleSpec":
        if self.min > self.max:
            raise ValueError(f"scale: min ({self.min}) is above max ({self.max})")
        return self


class RateLimit(Model):
    """A provider quota shared by every worker of the stage (enforced through Redis): at most `calls`
    LM calls and/or `tokens` tokens (prompt + completion) per `per_seconds` window."""

    calls: int | None = Field(None, gt=0, description="stage calls per window")
    tokens: int | None = Field(None, gt=0, description="LM tokens per window")
    per_seconds: float = Field(60.0, gt=0, description="the sliding window, seconds")


class StageSpec(Model):
    """A stage: name, version, input/output contracts and the DSPy module that implements it.

    `module` is an import path `package.module:Name` to a `dspy.Module` subclass, a factory
    returning one (called with `options` as keyword arguments), or a `dspy.Signature` (wrapped in
    `program`). `state` names JSON written by
    `module.save(...)`; its digest is part of the stage identity, so a new optimisation is a new
    version.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    version: Version = "1"
    description: str = ""
    module: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    program: Literal["predict", "chain_of_thought"] = "predict"
    state: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the module factory")
    inputs: Fields
    outputs: Fields
    lm: LMOverride | None = None
    retry: RetryPolicy = RetryPolicy()
    on_error: OnError = Field(OnError(), description="after retries: fail, fallback (value or stage) or skip")
    rate_limit: RateLimit | None = Field(None, description="calls/tokens per window, shared by all the stage's workers")
    time_limit: float | None = Field(None, gt=0, description="seconds before the stage is stopped")
    cache: CachePolicy = CachePolicy()
    scale: ScaleSpec = Field(ScaleSpec(), description="replicas of the stage's workers in a cluster: min, max, "
                                                      "per_replica (KEDA)")
    fusible: bool | Literal["lm"] = Field(
        False, description="true: may run in one task with adjacent fusible stages of a sequence; "
                           "'lm': also merged with an adjacent 'lm' stage into one signature and one LM call",
    )
    state_digest: str | None = Field(None, description="sha256 of the saved state; filled on load")
    pinned_only: bool = Field(
        False, description="served only to nodes that pin this version (an optimised version beside the old): "
                           "unpinned references keep resolving to the newest other version")

    @property
    def identity(self) -> str:
        digest = f"#{self.state_digest[:12]}" if self.state_digest else ""
        return f"{self.name}@{self.version}{digest}"

    @property
    def versioned_name(self) -> str:
        """`name@version`, without the state digest: how cache statistics name the stage."""
        return f"{self.name}@{self.version}"

    def resolve_state(self, base: Path) -> "StageSpec":
        """Absolute state path and its digest, relative paths read from the defining file's folder."""
        if self.state is None:
            return self
        path = Path(self.state) if Path(self.state).is_absolute() else base / self.state
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
        return self.model_copy(update={"state": str(path), "state_digest": digest})


# Between a call's soft time limit (raised in the call, recorded as a timeout error) and the hard kill of
# its process: a tenth of the soft limit, at least KILL_GRACE_MIN and at most KILL_GRACE_MAX seconds.
KILL_GRACE_MIN = 2.0
KILL_GRACE_MAX = 30.0


class Limits(Model):
    """A call's time bounds: `soft` is where it is stopped and recorded as a timeout, `hard` where its
    process is killed (prefork and green pools; the thread pool enforces neither, see workers/stage.py)."""

    soft: float
    hard: float

    @classmethod
    def of(cls, soft: float) -> "Limits":
        grace = min(max(soft / 10, KILL_GRACE_MIN), KILL_GRACE_MAX)
        return cls(soft=soft, hard=soft + grace)

    @classmethod
    def stage(cls, spec: "StageSpec", default: float) -> "Limits":
        """A stage's effective limits: its own `time_limit`, else the workers' default."""
        return cls.of(spec.time_limit or default)


class NodeBase(Model):
    id: str | None = Field(None, description="name of this node in outputs and traces")


class StageNode(NodeBase):
    kind: Literal["stage"] = "stage"
    stage: str = Field(description="stage name, or `name@version` to pin a version")
    version: Version | None = Field(None, description="stage version; set for every node at job start")
    inputs: dict[str, str] = Field(default_factory=dict, description="stage input field <- state field")
    outputs: dict[str, str] = Field(default_factory=dict, description="stage output field -> state field")
    critical: bool = Field(True, description="on a permanent error: fail the job, or record and continue")
    lm: LMOverride | None = None
    time_limit: float | None = Field(
        None, gt=0, description="seconds this call may take (Celery soft limit; set by an enclosing fan-out's timeout)"
    )


class SequenceNode(NodeBase):
    kind: Literal["sequence"] = "sequence"
    steps: list["Node"] = Field(min_length=1)


class SubPipelineNode(NodeBase):
    """Runs another pipeline (by name, resolved when the catalog loads) or an inline node."""

    kind: Literal["subpipeline"] = "subpipeline"
    pipeline: str | None = None
    node: "Node | None" = None

    @model_validator(mode="after")
    def _one_target(self) -> "SubPipelineNode":
        if (self.pipeline is None) == (self.node is None):
            raise ValueError("a subpipeline names exactly one of 'pipeline' or 'node'")
        return self


class BranchNode(NodeBase):
    """A router stage picks one named branch at run time from one of its output fields.

    Without a router the branch reads a state field already there (a conditional). The value is
    normalised (case, spaces, dashes) before it is matched against the branch names.
    """

    kind: Literal["branch"] = "branch"
    router: StageNode | None = None
    field: str
    branches: dict[str, "Node"] = Field(min_length=1)
    default: str | None = None

    @model_validator(mode="after")
    def _default_is_a_branch(self) -> "BranchNode":
        if self.default is not None and self.default not in self.branches:
            raise ValueError(f"default '{self.default}' is not a branch; branches: {', '.join(self.branches)}")
        return self


class StopCondition(Model):
    field: str
    threshold: float
    direction: Literal["above", "below"] = "above"


class LoopNode(NodeBase):
    """Iterative refinement: repeat `body` until a threshold, patience or max_iterations."""

    kind: Literal["loop"] = "loop"
    body: "Node"
    max_iterations: int = Field(3, ge=1, le=100)
    until: StopCondition | None = None
    patience: int | None = Field(None, ge=1, description="stop after this many iterations without improvement")
    epsilon: float = Field(0.0, ge=0, description="a smaller score change is no improvement")
    score_field: str | None = Field(None, description="state field patience watches; default: until.field")
    record: list[str] = Field(default_factory=list, description="state fields kept per iteration; default: outputs")

    @model_validator(mode="after")
    def _patience_has_a_score(self) -> "LoopNode":
        if self.patience is not None and self.score_field is None and self.until is None:
            raise ValueError("patience needs a score: set 'score_field' or 'until'")
        return self

    @property
    def watched(self) -> str | None:
        """The state field whose value is each iteration's score."""
        return self.score_field or (self.until.field if self.until else None)


class MapNode(NodeBase):
    """Fan `node` out over the items of a list field; gather results in input order."""

    kind: Literal["map"] = "map"
    over: str
    item: str = Field(description="state field each item is bound to inside the mapped node")
    node: "Node"
    collect: dict[str, str] = Field(description="mapped node output field -> list field in state")
    max_fanout: int = Field(32, ge=1, le=1000)
    overflow: Literal["fail", "truncate"] = Field("fail", description="more items than max_fanout")
    on_error: Literal["fail", "drop"] = Field("fail", description="an item fails: fail the job, or drop the item")
    item_timeout: float | None = Field(None, gt=0, description="seconds each stage call of an item may take")


MEMBER_NAME = r"^[A-Za-z0-9_\-]+$"
MERGERS = ("fields", "concat")
AGGREGATORS = ("weighted_voting", "best_confidence", "consensus")
IMPORT_PATH = re.compile(r"^[\w.]+:[\w.]+$")


def _check_named(what: str, value: str, builtins: tuple[str, ...]) -> str:
    if value not in builtins and not IMPORT_PATH.match(value):
        raise ValueError(f"{what} '{value}' is neither one of {', '.join(builtins)} nor an import path module:name")
    return value


class ParallelNode(NodeBase):
    """Named members run at once on the same state; a merger combines their outputs.

    A member that fails or times out is recorded and the rest are merged; when every member
    fails the job fails naming each member's error. `member_timeout` bounds each stage call of a
    member (Celery soft/hard time limits in prefork workers, the LM HTTP timeout in thread pools).
    """

    kind: Literal["parallel"] = "parallel"
    members: dict[str, "Node"] = Field(min_length=1)
    merge: str = Field("fields", description="fields | concat | import path module:function of a merger")
    concat_field: str | None = Field(None, description="with merge=concat: the text field joined across members")
    separator: str = Field("\n\n", description="with merge=concat: put between the members' texts")
    member_timeout: float | None = Field(None, gt=0, description="seconds each stage call of a member may take")

    @field_validator("members")
    @classmethod
    def _member_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(MEMBER_NAME, name):
                raise ValueError(f"member name '{name}' may hold only letters, digits, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _merger(self) -> "ParallelNode":
        _check_named("merge", self.merge, MERGERS)
        if self.merge == "concat" and not self.concat_field:
            raise ValueError("merge 'concat' needs 'concat_field', the text field to join")
        return self


class EnsembleNode(NodeBase):
    """N processors then an aggregator (weighted_voting, best_confidence, consensus, or custom).

    Each member reports `answer_field` and `confidence_field` (a float in [0, 1]) in its state;
    the node writes the aggregated answer and confidence to the same fields and the full report
    (outcome, every member's answer, confidence or error) to `report_field`.
    """

    kind: Literal["ensemble"] = "ensemble"
    members: list["Node"] = Field(min_length=1)
    aggregator: str = Field("weighted_voting", description="weighted_voting | best_confidence | consensus | module:fn")
    answer_field: str = "answer"
    confidence_field: str = "confidence"
    report_field: str = Field("ensemble", description="state field receiving the full report")
    threshold: float = Field(0.5, ge=0, le=1, description="consensus: share of members that must agree")
    member_timeout: float | None = Field(None, gt=0, description="seconds each stage call of a member may take")

    @model_validator(mode="after")
    def _aggregator(self) -> "EnsembleNode":
        _check_named("aggregator", self.aggregator, AGGREGATORS)
        names = self.member_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"ensemble members need distinct ids; repeated: {', '.join(duplicates)}")
        return self

    def member_names(self) -> list[str]:
        """A member's name in node paths: its id, else its position (`0`, `1`, ...)."""
        return [member.id or str(index) for index, member in enumerate(self.members)]


class AdaptiveNode(NodeBase):
    """Analyse the input and pick one of several named structures."""

    kind: Literal["adaptive"] = "adaptive"
    text_field: str
    structures: dict[str, "Node"] = Field(min_length=1)
    rules: dict[str, str] = Field(default_factory=dict, description="analysis type -> structure name")
    default: str | None = None
    complexity_threshold: float = Field(0.5, ge=0, le=1, description="score from which input is complex_reasoning")

    @model_validator(mode="after")
    def _names_are_structures(self) -> "AdaptiveNode":
        named = {**self.rules, "default": self.default} if self.default else dict(self.rules)
        for key, name in named.items():
            if name not in self.structures:
                raise ValueError(f"{key} -> '{name}' is not a structure; structures: {', '.join(self.structures)}")
        return self


NODE_MODELS: tuple[type[NodeBase], ...] = (
    StageNode,
    SequenceNode,
    SubPipelineNode,
    BranchNode,
    LoopNode,
    MapNode,
    ParallelNode,
    EnsembleNode,
    AdaptiveNode,
)

Node = Annotated[
    StageNode
    | SequenceNode
    | SubPipelineNode
    | BranchNode
    | LoopNode
    | MapNode
    | ParallelNode
    | EnsembleNode
    | AdaptiveNode,
    Field(discriminator="kind"),
]

AnyNode = Node | StageNode  # `Node` is the discriminated union; this is the same set for isinstance-free typing


def normalise_node(value: Any) -> Any:
    """Shorthands in data files: a bare string is a stage; a dict with `stage` and no kind too."""
    if isinstance(value, str):
        return {"kind": "stage", "stage": value}
    if isinstance(value, dict) and "kind" not in value and "stage" in value:
        return {"kind": "stage", **value}
    if isinstance(value, list):
        return {"kind": "sequence", "steps": value}
    return value


class PipelineSpec(Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_\-]*$")
    version: Version = "1"
    description: str = ""
    inputs: Fields
    outputs: list[str] = Field(default_factory=list, description="state fields reported as the answer")
    example: dict[str, Any] = Field(default_factory=dict)
    lazy: bool = Field(True, description="skip stages whose outputs nothing later reads and the job does not return")
    max_queued: int | None = Field(None, ge=1, description="jobs of this pipeline not ended yet above which the HTTP "
                                                          "API answers 429 (None: no limit)")
    webhook: Webhook | None = Field(None, description="completion webhook of jobs whose request names none")
    traffic: dict[Version, int] | None = Field(
        None, description="on the latest version: shares of unpinned jobs per version, e.g. {'1': 90, '2': 10} "
                          "(chosen at submit from the job id, contracts/traffic.py)")
    root: Node

    @field_validator("traffic")
    @classmethod
    def _shares(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is None:
            return None
        negative = sorted(version for version, share in value.items() if share < 0)
        if negative:
            raise ValueError(f"traffic shares must be >= 0; negative for version(s) {', '.join(negative)}")
        if not value or sum(value.values()) <= 0:
            raise ValueError("traffic needs at least one version with a share above 0")
        return value

    @field_validator("root", mode="before")
    @classmethod
    def _shorthand_root(cls, value: Any) -> Any:
        return _normalise_tree(value)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


_REBUILT: tuple[type[BaseModel], ...] = (*NODE_MODELS, PipelineSpec)
for _model in _REBUILT:
    _model.model_rebuild()


# ---- child nodes, derived from the models --------------------------------------------------------

Shape = Literal["one", "list", "dict"]


def _shape(annotation: Any) -> Shape | None:
    """How a field holds nodes (one, a list, a name -> node dict), or None when it holds none."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list and args and _holds_node(args[0]):
        return "list"
    if origin is dict and len(args) == 2 and _holds_node(args[1]):
        return "dict"
    return "one" if _holds_node(annotation) else None


def _holds_node(annotation: Any) -> bool:
    if isinstance(annotation, type):
        return issubclass(annotation, NodeBase)
    if get_origin(annotation) in (list, dict):
        return False
    return any(_holds_node(arg) for arg in get_args(annotation))


def _child_fields(model: type[NodeBase]) -> dict[str, Shape]:
    found = {name: _shape(field.annotation) for name, field in model.model_fields.items()}
    return {name: shape for name, shape in found.items() if shape is not None}


# node kind -> {field holding child nodes: how it holds them}
CHILD_FIELDS: dict[str, dict[str, Shape]] = {
    model.model_fields["kind"].default: _child_fields(model) for model in NODE_MODELS
}


def children(node: AnyNode) -> list[AnyNode]:
    """A node's direct children in field order (named sub-pipelines are not entered)."""
    found: list[AnyNode] = []
    for name, shape in CHILD_FIELDS[node.kind].items():
        value = getattr(node, name)
        if value is None:
            continue
        found.extend(value if shape == "list" else value.values() if shape == "dict" else [value])
    return found


def map_children(node: AnyNode, change: Callable[[AnyNode], AnyNode]) -> AnyNode:
    """The node with `change` applied to each direct child (a new node; the input is not touched)."""
    update: dict[str, Any] = {}
    for name, shape in CHILD_FIELDS[node.kind].items():
        value = getattr(node, name)
        if value is None:
            continue
        if shape == "list":
            update[name] = [change(child) for child in value]
        elif shape == "dict":
            update[name] = {key: change(child) for key, child in value.items()}
        else:
            update[name] = change(value)
    return node.model_copy(update=update)


def _normalise_tree(value: Any) -> Any:
    """Expand shorthands at every level of a raw (not yet validated) node tree."""
    value = normalise_node(value)
    if not isinstance(value, dict) or value.get("kind") not in CHILD_FIELDS:
        return value
    out = dict(value)
    for name, shape in CHILD_FIELDS[value["kind"]].items():
        child = out.get(name)
        if shape == "list" and isinstance(child, list):
            out[name] = [_normalise_tree(c) for c in child]
        elif shape == "dict" and isinstance(child, dict):
            out[name] = {key: _normalise_tree(c) for key, c in child.items()}
        elif shape == "one" and child is not None:
            out[name] = _normalise_tree(child)
    return out
