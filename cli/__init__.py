"""The `stagecoach` command line: run the local stack, submit jobs, read results."""
