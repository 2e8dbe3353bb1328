"""Benchmarks (not tests): run with `python -m bench.<name>` or `make bench`."""
