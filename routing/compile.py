"""Compile a pipeline's node tree into Celery canvas.

The table of node kinds (`routing.nodes.KINDS`) says how each kind compiles: statically known
shapes (stage, sequence, subpipeline) become chain/group/chord up front; kinds decided at run time
(branch, loop, map, adaptive, parallel, ensemble) become a routing task `pipeline.<kind>` that
decides when the job reaches it and replaces itself with the canvas it chose. Every task receives
the envelope as its first argument; node paths are fixed here so each output in the job is keyed
by where it ran (`retrieve`, `hops[2]/retrieve`).
"""

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, chain
from celery.canvas import Signature, _chain, chord, group

from contracts.catalog import Catalog
from contracts.envelope import Envelope
from contracts.names import FINISH_TASK, ROUTING_QUEUE, STAGE_PREFIX, routing_task, stage_queue, stage_task
from contracts.priority import broker_priority
from contracts.specs import AnyNode, Limits, PipelineSpec, StageNode
from routing.errors import RoutingError
from routing.kinds import NodeKind
from workers.ledger import Finish


class Compiler:
    def __init__(self, app: Celery, catalog: Catalog, kinds: Mapping[str, NodeKind]) -> None:
        self.app = app
        self.catalog = catalog
        self.kinds = kinds

    def pipeline(self, spec: PipelineSpec) -> _chain:
        """The whole job as a chain whose last task closes it (workers/ledger.py): the last stage when the
        pipeline ends with one (no extra hop), otherwise `pipeline.finish`, which builds the JobResult."""
        finish = Finish(spec.outputs, list(spec.inputs)).dump()
        body = self.node(spec.root, "")
        steps = list(body.tasks) if isinstance(body, _chain) else [body]
        if is_stage_step(steps[-1]):
            steps[-1].kwargs["finish"] = finish
        else:
            steps.append(self.app.signature(FINISH_TASK, kwargs={"finish": finish}, queue=ROUTING_QUEUE))
        for step in steps:
            if is_stage_step(step) or step is steps[-1]:
                # Celery's own result writes are skipped (a read and a write per task): a step hands
                # the envelope on in the next task's message, and the closing task stores the JobResult
                # under the job id itself, in the same script that closes the job. A crash is still
                # stored (store_errors_even_if_ignored), so the rest of the chain, the job too, fails with it.
                step.set(ignore_result=True)
        return chain(*steps)

    def job(self, spec: PipelineSpec, envelope: Envelope, priority: int | None = None) -> _chain:
        """The job's chain, its envelope bound to the first task(s). Each step's message shows the job id
        in place of Celery's repr of the envelope (what Flower lists; computing that repr was a good
        share of a stage's overhead). `priority` (0-9, None: the default) goes on the chain's first
        messages as the broker's number; every later message of the job inherits it from the task that
        sends it (`task_inherit_parent_priority`), runtime-compiled canvases (`task.replace`) included."""
        canvas = bind_input(self.pipeline(spec), envelope.model_dump(mode="json"))
        for step in canvas.tasks:
            if type(step) is Signature:
                step.set(argsrepr=f"(<envelope of job {envelope.job_id}>,)")
        canvas.set(priority=broker_priority(priority, self.redis_broker))
        return canvas  # type: ignore[no-any-return]

    @property
    def redis_broker(self) -> bool:
        return urlsplit(str(self.app.conf.broker_url)).scheme in ("redis", "rediss")

    def node(self, node: AnyNode, prefix: str) -> Signature:
        kind = self.kinds.get(node.kind)
        if kind is None:
            raise RoutingError(f"node kind '{node.kind}' is not in the router's table; known: {', '.join(self.kinds)}")
        if kind.compile is not None:
            return kind.compile(self, node, prefix)
        return self.runtime(node, prefix)

    def runtime(self, node: AnyNode, prefix: str) -> Signature:
        """The routing task that decides `node` when the job reaches it."""
        path = prefix + (node.id or node.kind)
        kwargs = {"node": node.model_dump(mode="json"), "path": path}
        return self.app.signature(routing_task(node.kind), kwargs=kwargs, queue=ROUTING_QUEUE)

    def stage(self, node: StageNode, prefix: str) -> Signature:
        path = prefix + (node.id or node.stage)
        ref = self.catalog.stage_ref(node.stage, node.version)  # `answer`, or `answer@1` when not the latest
        kwargs = {"node": node.model_dump(mode="json"), "path": path}
        sig = self.app.signature(stage_task(ref), kwargs=kwargs, queue=stage_queue(ref),
                                 kwargsrepr=repr({"path": path, "node": f"<stage {ref}>"}))
        if node.time_limit is not None:  # Celery enforces these in prefork and green pools
            limits = Limits.of(node.time_limit)
            sig.set(soft_time_limit=limits.soft, time_limit=limits.hard)
        return sig


def is_stage_step(sig: Signature) -> bool:
    """Whether a chain step is one stage task (or a fused run of them): as the last step it closes the job
    itself; a fan-out or a routing task hands its outcome on, so `pipeline.finish` follows it."""
    return type(sig) is Signature and str(sig.task).startswith(STAGE_PREFIX)


def bind_input(sig: Signature, envelope: dict[str, Any]) -> Signature:
    """Give the envelope to the first task(s) of a canvas (chain args are lost when chains merge)."""
    if isinstance(sig, _chain):
        first, *rest = sig.tasks
        return chain(bind_input(first, envelope), *rest)
    if isinstance(sig, chord):
        return chord(bind_input(sig.tasks, envelope), sig.body)
    if isinstance(sig, group):
        return group(*(bind_input(t, envelope) for t in sig.tasks))
    return sig.clone(args=(envelope,))
