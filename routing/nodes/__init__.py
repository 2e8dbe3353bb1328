"""Node kinds beyond stage/sequence/subpipeline; importing this registers them all."""

from routing.nodes import adaptive, branch, ensemble, loop, map, parallel  # noqa: F401
