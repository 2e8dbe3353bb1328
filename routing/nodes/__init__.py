"""The table of node kinds: how each kind of pipeline node compiles and decides.

One entry per node model in `contracts.specs.NODE_MODELS` (a test keeps the two in step). The
table is handed to the `Compiler` and to `routing.tasks.register`; importing a node module has no
side effect. Adding a kind touches its own module here, this table, the spec model, the builder
and the docs.
"""

from collections.abc import Mapping

from routing.kinds import NodeKind
from routing.nodes import adaptive, branch, loop, map, parallel, static

KINDS: Mapping[str, NodeKind] = {
    "stage": static.STAGE,
    "sequence": static.SEQUENCE,
    "subpipeline": static.SUBPIPELINE,
    "branch": branch.KIND,
    "loop": loop.KIND,
    "map": map.KIND,
    "parallel": parallel.PARALLEL,
    "ensemble": parallel.ENSEMBLE,
    "adaptive": adaptive.KIND,
}
