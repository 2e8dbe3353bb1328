"""Registries of node kinds: how each static kind compiles, how each runtime kind decides.

Each node module in `routing.nodes` adds its entries at import; `routing.nodes` imports them all.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery, Task
    from celery.canvas import Signature

    from contracts.envelope import Envelope
    from routing.compile import Compiler

# kind -> compile(compiler, node, prefix) for nodes whose shape is known before the job starts
NodeCompiler = Callable[["Compiler", Any, str], "Signature"]
STATIC_COMPILERS: dict[str, NodeCompiler] = {}

# kind -> decide(task, compiler, envelope, node_dict, path) for nodes decided at run time; returns
# `task.replace(canvas)` or the envelope as a dict
RuntimeHandler = Callable[["Task", "Compiler", "Envelope", dict[str, Any], str], Any]
RUNTIME_HANDLERS: dict[str, RuntimeHandler] = {}

# register(app, compiler) functions adding extra routing tasks, e.g. the chord body gathering a map
TaskRegistrar = Callable[["Celery", "Compiler"], None]
TASK_REGISTRARS: list[TaskRegistrar] = []
