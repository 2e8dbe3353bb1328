"""The HTTP API: a thin FastAPI layer over the Python client, the job ledger's records and the event log."""
