"""The benchmark's settings: one dataclass, a full and a quick preset.

Every number the suite uses (grid lengths, widths, batch sizes, repeats, seeds) lives here, so a
run is described by its preset name plus the fields it overrides; the report prints them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Tuple

__all__ = ["BenchConfig", "FULL", "QUICK", "SECTIONS", "preset"]

SECTIONS = ("oracle", "digits", "timeseries", "latency", "grids", "picard", "distributed")


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run.

    Quality tables:
        num_steps: T, the serial sampler's model calls (the grid length).
        widths: DRiffusion widths n (drafts per round); width 1 is the serial sampler.
        oracle_families: samplers run on the exact Gaussian-mixture oracles.
        oracle_batch: samples per oracle run (float64); oracle_data: exact samples for the distances
            (equal sizes make the sliced Wasserstein a plain sort; MMD² uses at most 1000 of each).
        mixture_dim, mixture_components: the higher-dimensional mixture with unequal variances.
        learned_families: samplers run on the trained models (eps-prediction, VP schedule).
        digits_batch, timeseries_batch: samples per run of the trained models.
        picard_tolerance: the stopping tolerance of the "at convergence" Picard rows.
        picard_sweep: tolerances of the Picard runs a baseline "at equal rounds" is chosen from
            (the best of them within the rounds; inf slides the full window every round).
        learned_picard_sweep, learned_picard_widths: the same on the (costlier) trained models, and
            the widths that get Picard rows there (the oracles get them at every width).
    Latency table:
        latency_steps: T for the timed runs; latency_widths; latency_repeats (medians over these);
        latency_digits_batch, mlp_batch, mlp_dim, mlp_hidden, mlp_depth: the timed models;
        memory_steps, memory_families: T and samplers of the memory measurement (profiling is slow);
        overhead_steps, overhead_repeats: the zero-cost-predictor timing of the scheduler itself.
    Seeds:
        seed_x: the starting noise x_T; seed_noise: the per-step noise; seed_data: reference data.
    """

    name: str = "full"
    num_steps: int = 50
    widths: Tuple[int, ...] = (1, 2, 3, 4)
    oracle_families: Tuple[str, ...] = ("ddim", "ddpm", "flow", "dpm", "unipc")
    oracle_batch: int = 2000
    oracle_data: int = 2000
    mixture_dim: int = 16
    mixture_components: int = 6
    learned_families: Tuple[str, ...] = ("ddim", "ddpm", "dpm", "unipc")
    digits_batch: int = 128
    timeseries_batch: int = 128
    picard_tolerance: float = 1e-3
    picard_sweep: Tuple[float, ...] = (math.inf, 1.0, 0.3, 0.1, 0.03, 0.01)
    learned_picard_sweep: Tuple[float, ...] = (math.inf, 0.3, 0.1)
    learned_picard_widths: Tuple[int, ...] = (4,)
    latency_steps: int = 50
    latency_widths: Tuple[int, ...] = (1, 2, 4)
    latency_repeats: int = 5
    latency_digits_batch: int = 16
    mlp_batch: int = 64
    mlp_dim: int = 64
    mlp_hidden: int = 1024
    mlp_depth: int = 4
    memory_steps: int = 10
    memory_families: Tuple[str, ...] = ("ddim", "ddpm")
    overhead_steps: int = 50
    overhead_repeats: int = 5
    seed_x: int = 1
    seed_noise: int = 2
    seed_data: int = 123
    threads: int = 2
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "BenchConfig":
        return replace(self, **changes)


FULL = BenchConfig()

QUICK = BenchConfig(
    name="quick",
    num_steps=20,
    widths=(1, 2, 3),  # width / T below WIDE_WINDOW (0.2): the smoke run stays clear of the warning
    oracle_batch=500,
    oracle_data=500,
    learned_families=("ddim",),
    picard_sweep=(math.inf, 0.3, 0.1, 0.03),
    learned_picard_sweep=(math.inf, 0.1),
    learned_picard_widths=(3,),
    digits_batch=64,
    timeseries_batch=64,
    latency_steps=20,
    latency_widths=(1, 4),
    latency_repeats=2,
    memory_steps=5,
    overhead_steps=20,
    overhead_repeats=3,
)


def preset(quick: bool) -> BenchConfig:
    return QUICK if quick else FULL
