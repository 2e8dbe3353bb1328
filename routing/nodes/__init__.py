"""Node kinds beyond stage/sequence/subpipeline; importing this registers them all."""

from routing.nodes import adaptive, branch, loop, map  # noqa: F401
