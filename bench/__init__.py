"""Benchmark harness: the same endpoint under each policy stack, one uvicorn worker each."""
