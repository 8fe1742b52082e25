"""Executors: how a round of draft evaluations runs (serial, batched, streams, distributed)."""
from backends.serial import SerialExecutor
from backends.batched import BatchedExecutor

__all__ = ["SerialExecutor", "BatchedExecutor"]
