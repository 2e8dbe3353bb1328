"""Node kinds beyond stage/sequence/subpipeline; importing this registers them all."""
