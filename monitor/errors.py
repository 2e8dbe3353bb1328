"""The monitor's errors (one tree, rooted in the project's StagecoachError)."""

from contracts.errors import StagecoachError


class MonitorError(StagecoachError):
    """Something the monitor was asked for cannot be given."""


class GraphError(MonitorError):
    """A drawing could not be made (no Graphviz, unknown format)."""


class BadQuery(MonitorError):
    """A query parameter of an HTTP request that is not what the endpoint takes."""
