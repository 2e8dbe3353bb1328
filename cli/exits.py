"""The `stagecoach` command's exit codes, in one place."""

EXIT_OK = 0
EXIT_FAILED = 1  # a job failed
EXIT_INPUT = 2  # bad input: unknown pipeline, bad field, bad file line
EXIT_PENDING = 3  # not finished in time, or an unknown job
EXIT_SERVICES = 4  # services unreachable, or the stack failed
