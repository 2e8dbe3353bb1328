"""What a node kind is to the router: how it compiles, how it decides at run time, which tasks it adds.

The table itself is `routing.nodes.KINDS`, handed to the `Compiler` and to `routing.tasks.register`;
nothing registers itself on import.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery, Task
    from celery.canvas import Signature

    from contracts.envelope import Envelope
    from routing.compile import Compiler
    from workers.ledger import Ledger

# compile(compiler, node, prefix): the canvas of a node whose shape is known before the job starts
NodeCompiler = Callable[["Compiler", Any, str], "Signature"]

# decide(task, compiler, envelope, node_dict, path) when the job reaches the node: returns
# `task.replace(canvas)` or the envelope as a dict
RuntimeHandler = Callable[["Task", "Compiler", "Envelope", dict[str, Any], str], Any]



@dataclass(frozen=True)
class Routing:
    """What a routing task is registered with: the app, the compiler of the canvases it continues with,
    and the job ledger that ends the job when a decision leaves it over."""

    app: "Celery"
    compiler: "Compiler"
    ledger: "Ledger"


# register(routing): an extra routing task of the kind (a chord body, a loop check)
TaskRegistrar = Callable[[Routing], None]


@dataclass(frozen=True)
class NodeKind:
    """One node kind. With `decide`, the kind has a routing task `pipeline.<kind>`; with `compile`
    too, `compile` builds what runs before that task (a branch's router stage)."""

    compile: NodeCompiler | None = None
    decide: RuntimeHandler | None = None
    tasks: tuple[TaskRegistrar, ...] = ()

    def __post_init__(self) -> None:
        if self.compile is None and self.decide is None:
            raise ValueError("a node kind needs a compile function, a runtime decision, or both")

    @property
    def runs_at_run_time(self) -> bool:
        return self.decide is not None
