"""The registry of identities and the result every proof returns.

An *identity* is a function that builds both sides of a claim from the library's own
coefficient functions (``driffusion_core.coefficients``) or state machine
(``driffusion_core.scheduler``), and returns a :class:`Result`: the simplified residual of
each side-by-side difference (0 when proved), or a counterexample.

Each identity is registered with :func:`identity`, saying whether it is *expected* to hold.
A run is as expected when every identity expected to hold holds (only identities registered
``numeric=True``, float checks of the torch code, may come out NUMERICALLY VERIFIED; a symbolic one
must be PROVED or hold in distribution) and every known non-identity (e.g. DDIM composition at
0 < eta < 1) is reported as failing *and* its documented defect (:attr:`Result.defect_checks`) is proved.
"""
from __future__ import annotations

import enum
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

__all__ = ["Status", "Result", "Identity", "Outcome", "identity", "IDENTITIES", "run_identities"]


class Status(str, enum.Enum):
    """What a proof established."""

    PROVED = "PROVED"  #: every residual simplifies to 0 symbolically (pathwise / as functions)
    IN_DISTRIBUTION = "HOLDS IN DISTRIBUTION (mean, covariance)"  #: Gaussian laws agree in mean and covariance
    VERIFIED = "VERIFIED"  #: checked exhaustively on a finite range, or bit for bit on the code
    NUMERIC = "NUMERICALLY VERIFIED"  #: at many random rational points, to high precision
    FAILS = "FAILS"  #: a residual is nonzero; the result carries its size and a counterexample
    ERROR = "ERROR"  #: the proof itself raised

    @property
    def holds(self) -> bool:
        return self in (Status.PROVED, Status.IN_DISTRIBUTION, Status.VERIFIED, Status.NUMERIC)


@dataclass
class Result:
    """The outcome of one identity.

    Attributes:
        status: what was established.
        residuals: name -> simplified residual (a sympy expression; 0 when proved).
        detail: one or two sentences: how it was checked, or the size of the defect.
        counterexample: for FAILS, the point (schedule values) and the residuals' values there.
        defect_checks: for a known non-identity, claim -> proved? for each documented part of its
            defect (the defect formula, the end points where it vanishes...). A known non-identity is
            as expected only when this is non-empty and all True: failing is not enough, it must fail
            *in the documented way*.
    """

    status: Status
    residuals: Dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    counterexample: Optional[Dict[str, Any]] = None
    defect_checks: Dict[str, bool] = field(default_factory=dict)

    @property
    def defect_proved(self) -> bool:
        """Every documented defect claim is proved (and there is at least one)."""
        return bool(self.defect_checks) and all(self.defect_checks.values())


@dataclass(frozen=True)
class Identity:
    """A registered identity: ``func()`` returns its :class:`Result`."""

    name: str
    family: str
    statement: str
    expect_holds: bool
    func: Callable[[], Result]
    numeric: bool = False  #: a float check of the code: NUMERICALLY VERIFIED is its holding result


@dataclass
class Outcome:
    """An identity together with its result and the time its proof took."""

    identity: Identity
    result: Result
    seconds: float

    @property
    def as_expected(self) -> bool:
        """Holds when expected to hold (NUMERIC only for a ``numeric`` identity: a symbolic identity
        that only reaches the numeric fallback is not proved); a known non-identity fails (not errors)
        and its documented defect is proved."""
        st = self.result.status
        if st is Status.ERROR:
            return False
        if self.identity.expect_holds:
            return st.holds and (st is not Status.NUMERIC or self.identity.numeric)
        return st is Status.FAILS and self.result.defect_proved


#: every registered identity, in registration (= report) order
IDENTITIES: List[Identity] = []


def identity(name: str, family: str, statement: str, expect_holds: bool = True, numeric: bool = False):
    """Register ``func`` as the identity ``name`` (e.g. ``"ddpm.posterior_bayes"``).

    Arguments:
        name: unique dotted name, ``family.claim``.
        family: the heading it is reported under (``"DDPM"``, ``"DDIM"``...).
        statement: the claim in words, in the paper's notation.
        expect_holds: False for a known non-identity, whose failure is part of the record; its
            result must carry ``defect_checks`` (the documented defect, proved).
        numeric: True for a float check of the torch code against the exact mirrors, whose result is
            NUMERICALLY VERIFIED by nature; for every other identity NUMERIC is not as expected.
    """

    def register(func: Callable[[], Result]) -> Callable[[], Result]:
        if any(i.name == name for i in IDENTITIES):
            raise ValueError(f"identity {name!r} is registered twice")
        IDENTITIES.append(Identity(name, family, statement, expect_holds, func, numeric))
        return func

    return register


def run_identities(identities: Optional[List[Identity]] = None) -> List[Outcome]:
    """Run identities (default: all registered), catching errors into :attr:`Status.ERROR` results."""
    out = []
    for ident in IDENTITIES if identities is None else identities:
        start = time.perf_counter()
        try:
            result = ident.func()
        except Exception as exc:  # a proof that crashes is reported, not hidden
            result = Result(Status.ERROR, detail=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        out.append(Outcome(ident, result, time.perf_counter() - start))
    return out
