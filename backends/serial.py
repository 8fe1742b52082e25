"""The reference executor: one predictor call per draft, in order (defined in the core)."""
from driffusion_core.executor import SerialExecutor

__all__ = ["SerialExecutor"]
