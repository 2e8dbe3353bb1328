"""The composition root of the processes workers run: `celery -A workers.app worker -Q stage.<name>`.

The runtime gets every stage task from the factory and the routing tasks (`pipeline.run`, runtime
nodes, `pipeline.finish`) from here, passed explicitly: the workers package itself never names
routing, whose tasks build on it.
"""

from routing.tasks import register as register_routing
from workers.factory import create_runtime

runtime = create_runtime(plugins=[register_routing])
app = runtime.app
