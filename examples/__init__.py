"""Example DSPy stages used by the pipelines in `pipelines/`."""
