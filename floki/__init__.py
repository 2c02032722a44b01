"""Floki: a disk-backed fanout message broker spoken over the Redis protocol."""

__version__ = "0.1.0"
