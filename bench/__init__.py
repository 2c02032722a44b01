"""Benchmark runner for Floki against Redis Streams (`make bench`, `python -m bench.run`)."""
