"""A pipeline's node tree as a drawing: one graph model, written as Mermaid text or Graphviz DOT
(rendered to SVG/PNG by Graphviz's `dot`). `stagecoach graph` and the monitor's web page both use
`render`, so they show the same drawing.
"""

from collections.abc import Callable
from itertools import count
from typing import Any

from pydantic import BaseModel, Field

from contracts.catalog import Catalog
from contracts.specs import (
    AdaptiveNode,
    BranchNode,
    EnsembleNode,
    LoopNode,
    MapNode,
    Node,
    ParallelNode,
    SequenceNode,
    StageNode,
    SubPipelineNode,
)
from monitor.errors import GraphError

FORMATS = ("mermaid", "dot", "svg", "png")


class GraphNode(BaseModel):
    id: str
    label: str
    shape: str = Field(description="stage | decision | fan | terminal")
    stage: str | None = None


class GraphEdge(BaseModel):
    src: str
    dst: str
    label: str = ""


class Graph(BaseModel):
    pipeline: str
    nodes: list[GraphNode] = Field(default_factory=list)
    edges: list[GraphEdge] = Field(default_factory=list)


Ends = tuple[list[str], list[str]]  # (entry node ids, exit node ids) of a sub-drawing


class Builder:
    def __init__(self, catalog: Catalog, pipeline: str) -> None:
        self.catalog = catalog
        self.graph = Graph(pipeline=pipeline)
        self.ids = count()
        self.kinds: dict[str, Callable[[Any], Ends]] = {
            "stage": self.stage, "sequence": self.sequence, "subpipeline": self.subpipeline,
            "branch": self.branch, "loop": self.loop, "map": self.map, "parallel": self.fan,
            "ensemble": self.fan, "adaptive": self.adaptive,
        }

    def add(self, label: str, shape: str, stage: str | None = None) -> str:
        node_id = f"n{next(self.ids)}"
        self.graph.nodes.append(GraphNode(id=node_id, label=label, shape=shape, stage=stage))
        return node_id

    def link(self, sources: list[str], targets: list[str], label: str = "") -> None:
        self.graph.edges.extend(GraphEdge(src=s, dst=t, label=label) for s in sources for t in targets)

    def build(self, node: Node | StageNode) -> Ends:
        return self.kinds[node.kind](node)

    def stage(self, node: StageNode) -> Ends:
        label = node.stage if not node.id or node.id == node.stage else f"{node.id}: {node.stage}"
        one = self.add(label, "stage", node.stage)
        return [one], [one]

    def sequence(self, node: SequenceNode) -> Ends:
        first, last = self.build(node.steps[0])
        for step in node.steps[1:]:
            entries, exits = self.build(step)
            self.link(last, entries)
            last = exits
        return first, last

    def subpipeline(self, node: SubPipelineNode) -> Ends:
        target = self.catalog.pipeline(node.pipeline).root if node.pipeline else node.node
        assert target is not None  # the spec validator guarantees one of the two
        return self.build(target)

    def choose(self, head: str, options: dict[str, Node]) -> Ends:
        exits: list[str] = []
        for name, option in options.items():
            entries, ends = self.build(option)
            self.link([head], entries, name)
            exits += ends
        return [head], exits

    def branch(self, node: BranchNode) -> Ends:
        decide = self.add(f"branch on {node.field}", "decision")
        if node.router is None:
            return self.choose(decide, node.branches)
        entries, exits = self.stage(node.router)
        self.link(exits, [decide])
        return entries, self.choose(decide, node.branches)[1]

    def adaptive(self, node: AdaptiveNode) -> Ends:
        return self.choose(self.add(f"adaptive on {node.text_field}", "decision"), node.structures)

    def loop(self, node: LoopNode) -> Ends:
        head = self.add(f"loop (at most {node.max_iterations})", "decision")
        entries, exits = self.build(node.body)
        self.link([head], entries, "iterate")
        self.link(exits, [head], "again?")
        return [head], [head]

    def map(self, node: MapNode) -> Ends:
        fan = self.add(f"map over {node.over}", "fan")
        gather = self.add("gather", "fan")
        entries, exits = self.build(node.node)
        self.link([fan], entries, "each item")
        self.link(exits, [gather])
        return [fan], [gather]

    def fan(self, node: ParallelNode | EnsembleNode) -> Ends:
        if isinstance(node, ParallelNode):
            members, how = dict(node.members), f"merge: {node.merge}"
        else:
            members, how = dict(zip(node.member_names(), node.members, strict=True)), node.aggregator
        fork = self.add(node.kind, "fan")
        join = self.add(how, "fan")
        for name, member in members.items():
            entries, exits = self.build(member)
            self.link([fork], entries, name)
            self.link(exits, [join])
        return [fork], [join]


def build(catalog: Catalog, pipeline: str) -> Graph:
    """The drawing of a pipeline: start -> its node tree -> finish."""
    spec = catalog.pipeline(pipeline)
    builder = Builder(catalog, spec.name)
    start = builder.add(f"{spec.name} inputs", "terminal")
    entries, exits = builder.build(spec.root)
    builder.link([start], entries)
    builder.link(exits, [builder.add("finish", "terminal")])
    return builder.graph


MERMAID_SHAPES = {"stage": '["{}"]', "decision": '{{"{}"}}', "fan": '(["{}"])', "terminal": '(("{}"))'}
DOT_SHAPES = {"stage": "box", "decision": "diamond", "fan": "ellipse", "terminal": "oval"}


def mermaid(graph: Graph) -> str:
    lines = ["flowchart TD"]
    lines += [f"  {n.id}{MERMAID_SHAPES[n.shape].format(_quote(n.label))}" for n in graph.nodes]
    lines += [f"  {e.src} -->|{_quote(e.label)}| {e.dst}" if e.label else f"  {e.src} --> {e.dst}"
              for e in graph.edges]
    return "\n".join(lines) + "\n"


def dot(graph: Graph) -> str:
    lines = [f'digraph "{graph.pipeline}" {{', "  rankdir=TB;",
             '  node [fontname="Helvetica", fontsize=11, style="rounded,filled", fillcolor="#eef3fb"];',
             '  edge [fontname="Helvetica", fontsize=9, color="#667788"];']
    for n in graph.nodes:
        stage = f', class="stage", id="stage.{n.stage}.{n.id}"' if n.stage else f', id="{n.id}"'
        fill = ', fillcolor="#dceeff"' if n.stage else ', fillcolor="#f4f4f4"'
        lines.append(f'  {n.id} [label="{_quote(n.label)}", shape={DOT_SHAPES[n.shape]}{fill}{stage}];')
    lines += [f'  {e.src} -> {e.dst} [label="{_quote(e.label)}"];' for e in graph.edges]
    return "\n".join([*lines, "}"]) + "\n"


def render(graph: Graph, fmt: str) -> bytes:
    """The drawing as mermaid/dot text, or rendered by Graphviz to svg/png."""
    if fmt == "mermaid":
        return mermaid(graph).encode()
    if fmt == "dot":
        return dot(graph).encode()
    if fmt not in FORMATS:
        raise GraphError(f"format '{fmt}': not one of {', '.join(FORMATS)}")
    import graphviz

    try:
        return bytes(graphviz.Source(dot(graph)).pipe(format=fmt))
    except graphviz.ExecutableNotFound:
        raise GraphError("Graphviz's `dot` is not installed (Debian: apt-get install graphviz; "
                         "`make system-deps`)") from None


def _quote(text: str) -> str:
    return text.replace('"', "'")
