"""Benchmarks: jaxgen and its peer measured side by side in one process (`jaxgen bench ...`)."""
