"""Node kinds beyond stage/sequence/subpipeline; importing this registers them all."""

from routing.nodes import map  # noqa: F401
