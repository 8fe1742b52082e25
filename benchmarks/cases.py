"""The benchmark problems: a model, a sampler family, a grid, a batch, and how to score samples.

Built-in models (all made by the project's own code, nothing downloaded):

* ``ring``: the exact 2-D ring oracle (``solvers.ring_mixture``, 8 modes);
* ``mixture16``: an exact D-dimensional mixture with unequal per-component, per-coordinate
  variances (D = 16, 6 components by default);
* ``digits``: the eps-prediction UNet on scikit-learn's 8x8 digits (``benchmarks.models``),
  scored by the Fréchet distance in the digits classifier's feature space against held-out digits;
* ``timeseries``: the 1-D time-series eps model, scored by sliced Wasserstein against fresh data.

The oracles run DDIM, DDPM, flow matching (the oracle gives the exact velocity for a
``FlowSchedule``), DPM-Solver++ 2M and UniPC; the trained models are VP eps-models, so they run DDIM,
DDPM, DPM-Solver++ 2M and UniPC.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks.config import BenchConfig
from benchmarks.metrics import MMDTo, SlicedWassersteinTo
from driffusion_core import FlowSchedule, TimeGrid, VPSchedule
from driffusion_core.transition import SkipTransition
from solvers import DDIMSkip, DDPMSkip, DPMSolverSkip, FlowEulerSkip, GaussianMixture, UniPCSkip, ring_mixture

__all__ = ["Case", "ModelUnavailable", "oracle_cases", "digits_cases", "timeseries_cases", "vp_schedule", "family"]

Scorer = Callable[[torch.Tensor], Dict[str, float]]


class ModelUnavailable(RuntimeError):
    """A built-in trained model cannot be loaded (its weights are missing)."""


@dataclass
class Case:
    """One quality table: a predictor, a sampler family and how to score its samples.

    Attributes:
        model, family: names for the report (e.g. ``"ring"``, ``"ddim"``).
        transition, grid: the sampler (a SkipTransition and its time grid of T steps).
        predictor: ``f(x, t) -> Tensor`` called with the grid's model times.
        shape, dtype: the batch of starting states.
        score: sample set -> {distance name: value} (distance to the data; lower is better).
        floor: the same distances for an independent set of true data (the finite-sample floor).
        floor_sd: each distance's standard deviation over :data:`FLOOR_DRAWS` such sets (the first is
            ``floor``): how much a column's value moves from one draw of the same law to another.
        metric_names: the distance columns, in order.
        picard_widths: the widths that get Picard rows (None: every width above 1).
        picard_sweep: the tolerances of the Picard runs the equal-rounds baselines are chosen from.
    """

    model: str
    family: str
    transition: SkipTransition
    grid: TimeGrid
    predictor: Callable[..., torch.Tensor]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    score: Scorer
    floor: Dict[str, float]
    metric_names: List[str]
    notes: List[str] = field(default_factory=list)
    picard_widths: Optional[Tuple[int, ...]] = None
    picard_sweep: Tuple[float, ...] = ()
    floor_sd: Dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model} / {self.family}"


def vp_schedule() -> VPSchedule:
    """The schedule every built-in VP model was trained for: linear betas 1e-4 .. 0.02, 1000 steps."""
    return VPSchedule.linear(1000, 1e-4, 0.02)


FLOW_SHIFT = 3.0  # SD3's shift
FLOOR_DRAWS = 8  # sets of true data behind the floor's spread (the first is the floor row)
MMD_POINTS = 1000  # MMD² uses the first 1000 samples and 1000 data points (its cost is quadratic)


def family(name: str, num_steps: int) -> Tuple[SkipTransition, TimeGrid, object]:
    """(transition, grid, schedule) of a sampler family with T = ``num_steps``.

    DDIM steps as diffusers' DDIMScheduler with trailing spacing; DDPM uses the closed-form posterior
    between consecutive listed timesteps; flow uses SD3's shifted sigmas; dpm is DPM-Solver++ 2M
    (midpoint, diffusers' DPMSolverMultistepScheduler default) on the trailing grid to sigma = 0; unipc is
    UniPC (bh2, order 2 with its corrector, lower_order_final: diffusers' UniPCMultistepScheduler default)
    on the same grid.
    """
    if name == "ddim":
        s = vp_schedule()
        return DDIMSkip(s), s.timesteps(num_steps, "trailing", step_to="stride"), s
    if name == "ddpm":
        s = vp_schedule()
        return DDPMSkip(s), s.timesteps(num_steps, "trailing"), s
    if name == "flow":
        s = FlowSchedule(shift=FLOW_SHIFT)
        return FlowEulerSkip(s), s.timesteps(num_steps), s
    if name == "dpm":
        s = vp_schedule()
        return DPMSolverSkip(s), s.timesteps(num_steps, "trailing"), s
    if name == "unipc":
        s = vp_schedule()
        grid = s.timesteps(num_steps, "trailing")
        return UniPCSkip(s, final_level=float(grid.t_to[-1])), grid, s
    raise ValueError(f"unknown sampler family {name!r}; choose ddim, ddpm, flow, dpm or unipc")



def unequal_mixture(dim: int, components: int, seed: int) -> GaussianMixture:
    """Means ~ N(0, I), per-component per-coordinate variances in [0.01, 0.25]: unit-scale data, unequal spreads."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    variances = 0.01 + 0.24 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, variances, weights)


def floor_of(score: Scorer, draw: Callable[[int], torch.Tensor]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(floor, floor_sd): the distances of ``draw(0)``, a set of true data, and each one's standard deviation
    over ``draw(0 .. FLOOR_DRAWS - 1)``."""
    scores = [score(draw(k)) for k in range(FLOOR_DRAWS)]
    return scores[0], {m: statistics.stdev(s[m] for s in scores) for m in scores[0]}


def _oracle_scorer(gmm: GaussianMixture, n_data: int, n_floor: int,
                   seed: int) -> Tuple[Scorer, Dict[str, float], Dict[str, float]]:
    """Distances to ``n_data`` exact samples; the floor scores ``n_floor`` (the batch size) other exact samples
    (seed + 1; its spread: seeds seed + 1 .. seed + FLOOR_DRAWS)."""
    data = gmm.sample(n_data, torch.Generator().manual_seed(seed))
    sw, mmd = SlicedWassersteinTo(data), MMDTo(data[:MMD_POINTS])

    def score(x: torch.Tensor) -> Dict[str, float]:
        return {"sliced W2": sw(x), "MMD²": mmd(x[:MMD_POINTS])}

    return (score, *floor_of(score, lambda k: gmm.sample(n_floor, torch.Generator().manual_seed(seed + 1 + k))))


def oracle_cases(cfg: BenchConfig) -> List[Case]:
    """The exact-oracle problems: ring and the higher-dimensional mixture, for each oracle family."""
    gmms = {
        "ring": ring_mixture(),
        f"mixture{cfg.mixture_dim}": unequal_mixture(cfg.mixture_dim, cfg.mixture_components, cfg.seed_data),
    }
    cases = []
    for model, gmm in gmms.items():
        score, floor, floor_sd = _oracle_scorer(gmm, cfg.oracle_data, cfg.oracle_batch, cfg.seed_data)
        for fam in cfg.oracle_families:
            transition, grid, schedule = family(fam, cfg.num_steps)
            prediction = "velocity" if fam == "flow" else "epsilon"
            cases.append(
                Case(model, fam, transition, grid, gmm.predictor(schedule, prediction), (cfg.oracle_batch, gmm.dim),
                     torch.float64, score, floor, ["sliced W2", "MMD²"], picard_sweep=cfg.picard_sweep,
                     floor_sd=floor_sd)
            )
    return cases


def _load(loader: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    try:
        return loader()
    except FileNotFoundError as e:
        raise ModelUnavailable(f"{e} (the built-in model's weights are missing)") from e


def _as_predictor(net: torch.nn.Module) -> Callable[..., torch.Tensor]:
    def f(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        with torch.no_grad():
            return net(x, t)

    return f


def digits_cases(cfg: BenchConfig) -> List[Case]:
    """The digits UNet, Fréchet distance in the digits classifier's features against the test split."""
    from benchmarks.models import digits_data, frechet_distance, load_digits_classifier, load_digits_unet

    unet, clf = _load(load_digits_unet), _load(load_digits_classifier)
    with torch.no_grad():
        ref = clf.features(digits_data("test"))
        train = digits_data("train")

    def score(x: torch.Tensor) -> Dict[str, float]:
        with torch.no_grad():
            return {"Fréchet": frechet_distance(clf.features(x.float()), ref)}

    def pick(k: int) -> torch.Tensor:  # batch-size training digits, a fresh choice per draw (k = 0: the floor row)
        order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed_data + k))
        return train[order[: cfg.digits_batch]]

    floor, floor_sd = floor_of(score, pick)
    cases = []
    for fam in cfg.learned_families:
        transition, grid, _ = family(fam, cfg.num_steps)
        cases.append(
            Case("digits", fam, transition, grid, _as_predictor(unet), (cfg.digits_batch, 1, 8, 8), torch.float32,
                 score, floor, ["Fréchet"],
                 [f"floor: {cfg.digits_batch} training digits against the {ref.shape[0]} test digits"],
                 cfg.learned_picard_widths, cfg.learned_picard_sweep, floor_sd)
        )
    return cases


def timeseries_cases(cfg: BenchConfig) -> List[Case]:
    """The time-series model, sliced Wasserstein against fresh series from the generator."""
    from benchmarks.models import load_timeseries_model, timeseries_data

    net = _load(load_timeseries_model)
    n = cfg.timeseries_batch
    sw = SlicedWassersteinTo(timeseries_data(n, seed=cfg.seed_data))

    def score(x: torch.Tensor) -> Dict[str, float]:
        return {"sliced W2": sw(x)}

    floor, floor_sd = floor_of(score, lambda k: timeseries_data(n, seed=cfg.seed_data + 1 + k))

    cases = []
    for fam in cfg.learned_families:
        transition, grid, _ = family(fam, cfg.num_steps)
        cases.append(
            Case("timeseries", fam, transition, grid, _as_predictor(net), (cfg.timeseries_batch, 1, 32), torch.float32,
                 score, floor, ["sliced W2"],
                 [f"floor: {n} fresh series against the {n} reference series"],
                 cfg.learned_picard_widths, cfg.learned_picard_sweep, floor_sd)
        )
    return cases
