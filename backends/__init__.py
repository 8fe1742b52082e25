"""Executors: how a round of draft evaluations runs (serial, batched, streams, distributed)."""
from backends.serial import SerialExecutor
from backends.batched import BatchedExecutor
from backends.streams import StreamExecutor
from backends.distributed import DistributedExecutor, init_from_env

__all__ = ["SerialExecutor", "BatchedExecutor", "StreamExecutor", "DistributedExecutor", "init_from_env"]
