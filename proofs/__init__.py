"""proofs: sympy proofs of the identities DRiffusion's operators rely on (``python -m proofs``).

Our side of every identity is built from the library's own code, ``driffusion_core.coefficients``
(formulas written once, for floats, tensors and sympy alike) and ``driffusion_core.scheduler``'s
state machine, so a proof cannot drift from the code (the other side: diffusers' or k-diffusion's update
transcribed from their code, or a law such as Bayes' rule). Families:

* :mod:`proofs.ddpm`              posterior = Bayes' rule, kernels compose, coupled noise is the chain
* :mod:`proofs.ddim`              eta = 0 composes, eta = 1 is DDPM, the marginal at any eta,
                                  and the known failure to compose at 0 < eta < 1
* :mod:`proofs.flow`              Euler composes, exact on the conditional path
* :mod:`proofs.dpm`               DPM-Solver++: first order is DDIM and composes, 2M with a frozen
                                  prediction is first order, UniPC's UniP-2 (bh2) is 2M midpoint, heun
                                  exact for x0_hat linear in lambda (midpoint's defect recorded), exact
                                  on the conditional path
* :mod:`proofs.parameterization`  epsilon / sample / v_prediction / velocity conversions are inverses
* :mod:`proofs.diffusers_steps`   one-level steps = diffusers' DDIM, DDPM, FlowMatchEuler, DPMSolverMultistep
                                  (first order and 2M), UniPCMultistep, EulerDiscrete and EulerAncestralDiscrete
                                  updates
* :mod:`proofs.kdiffusion`        k-diffusion's sample_euler, sample_euler_ancestral and sample_dpmpp_2m steps
* :mod:`proofs.operator_checks`   the torch operators agree with the proved symbolic steps; their drafts
                                  (multistep ones included) are the chain of their own steps, their coupled
                                  noise the composed noise
* :mod:`proofs.rounds`            round counts of the scheduler's plan, and their limits

Shared pieces: :mod:`proofs.registry` (results, the ``@identity`` registry), :mod:`proofs.algebra`
(symbols, domains including DPM-Solver's lambda levels, the exact zero test), :mod:`proofs.operators`
(the operators on symbols), :mod:`proofs.report` / :mod:`proofs.display` (the table).

Use::

    from proofs import run_all
    outcomes = run_all()                      # every identity, in report order
    all(o.as_expected for o in outcomes)
"""
from __future__ import annotations

from typing import List, Optional

from proofs.registry import IDENTITIES, Identity, Outcome, Result, Status, identity, run_identities

__all__ = ["IDENTITIES", "Identity", "Outcome", "Result", "Status", "identity", "load", "run_all"]

_MODULES = ("ddpm", "ddim", "flow", "dpm", "parameterization", "diffusers_steps", "kdiffusion", "operator_checks",
            "rounds")


def load() -> List[Identity]:
    """Import every proof module (registering its identities); returns the registry."""
    import importlib

    for name in _MODULES:
        importlib.import_module(f"proofs.{name}")
    return IDENTITIES


def run_all(select: Optional[str] = None) -> List[Outcome]:
    """Run every identity (or those whose name contains ``select``)."""
    chosen = [i for i in load() if select is None or select in i.name]
    return run_identities(chosen)
