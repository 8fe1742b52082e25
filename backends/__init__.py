"""Executors: how a round of draft evaluations runs (serial, batched, streams, distributed)."""
from backends.serial import SerialExecutor
from backends.batched import BatchedExecutor, per_sample
from backends.streams import StreamExecutor
from backends.distributed import DistributedExecutor, init_from_env

__all__ = ["SerialExecutor", "BatchedExecutor", "per_sample", "StreamExecutor", "DistributedExecutor", "init_from_env"]
