r"""Symbols, the parameterization of noise levels, and the zero test every proof uses.

Key (notation of the paper and of ``driffusion_core.coefficients``):

* ``abar``  :math:`\bar\alpha` of a VP level; a chain of levels t_0 -> t_1 -> ... -> t_m goes from the
  noisiest to the cleanest, :math:`0 < \bar\alpha_{t_0} < \dots < \bar\alpha_{t_m} < 1`.
* ``r``  the inverse signal-to-noise ratio :math:`r = (1-\bar\alpha)/\bar\alpha > 0`, so
  :math:`\bar\alpha = 1/(1+r)`. A chain is written with positive symbols: :math:`r_{t_m} = r`,
  :math:`r_{t_i} = r_{t_{i+1}} + g_{i+1}`, :math:`g_i > 0`. This covers exactly the constraint set
  above, and every square root a coefficient takes is then the root of a positive rational
  function, which sympy can factor, split and cancel (see :func:`canon`).
* ``eta`` in (0, 1) is written :math:`\eta = 1/\sqrt{1+k}`, k > 0, for the same reason.
* ``lambda`` :math:`\lambda = \log(\alpha/\sigma)` (DPM-Solver's half log-SNR): :class:`LambdaLevels` gives
  each level a positive :math:`q = e^\lambda = \alpha/\sigma` and builds its interpolant from q without
  logarithms (VP: :math:`\bar\alpha = q^2/(1+q^2)`); the lambdas are a real symbol and positive gaps
  :math:`h > 0`. :meth:`LambdaLevels.form` turns the logarithms a coefficient takes into lambdas and the
  exponentials of lambdas into q's, and the zero test then treats q's and lambdas as independent: a
  residual that vanishes for independent (q, lambda) vanishes in particular at :math:`q = e^\lambda`.

The zero test (:func:`canon`): a residual is split into its coefficients as a polynomial in the
state symbols (x, x0, eps, z...). Each coefficient is evaluated exactly in a field of rational
functions in which the square root of every irreducible (positive) factor of every radicand is one
more generator rho with rho^2 = factor; the numerator reduced modulo those relations is 0 exactly
when the coefficient is (roots of distinct irreducible factors are independent). If the exact test
does not close (an expression outside that class), :func:`check` falls back to a high-precision
evaluation at many random rational points of the domain: all below 1e-40 is reported as
"numerically verified", never as proved; one value above is a counterexample, which settles FAILS.
"""
from __future__ import annotations

import random
from fractions import Fraction
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import sympy as sp
from sympy.polys.fields import field

from driffusion_core import coefficients as C
from proofs.registry import Result, Status

__all__ = [
    "real",
    "Levels",
    "EtaInUnitInterval",
    "LambdaLevels",
    "Domain",
    "canon",
    "check",
    "fmt_point",
    "NUMERIC_POINTS",
]

#: random points of the numeric fallback (and of counterexample searches)
NUMERIC_POINTS = 40
#: precision (digits) of numeric evaluation; below 10**-(PRECISION - 10) counts as zero
PRECISION = 50
_ZERO = sp.Float(10) ** (-(PRECISION - 10))


def real(names: str):
    """Real symbols (states, predictions, noises): ``x, x0 = real("x x0")``."""
    return sp.symbols(names, real=True)


Sample = Tuple[Dict[sp.Symbol, sp.Expr], Dict[str, sp.Expr]]


class Domain:
    """Where an identity is claimed: a sampler of points and a fixed, readable point.

    ``sample(rng)`` and ``fixed`` return ``(subs, shown)``: values for the symbols, and the same
    point in the reader's quantities (e.g. ``abar_t = 1/5``). Domains combine with ``&``.
    """

    def __init__(self, sample: Callable[[random.Random], Sample], fixed: Sample):
        self.sample = sample
        self.fixed = fixed

    def __and__(self, other: "Domain") -> "Domain":
        def both(rng: random.Random) -> Sample:
            (a, sa), (b, sb) = self.sample(rng), other.sample(rng)
            return {**a, **b}, {**sa, **sb}

        (a, sa), (b, sb) = self.fixed, other.fixed
        return Domain(both, ({**a, **b}, {**sa, **sb}))

    @staticmethod
    def free(symbols: Iterable[sp.Symbol], lo: int = -3, hi: int = 3) -> "Domain":
        """Unconstrained real symbols (states, noises): random rationals in [lo, hi]."""
        symbols = list(symbols)

        def sample(rng: random.Random) -> Sample:
            vals = {s: sp.Rational(rng.randint(lo * 97, hi * 97), 97) for s in symbols}
            return vals, {str(s): v for s, v in vals.items()}

        fixed = {s: sp.Rational(i + 2, 3) * (-1) ** i for i, s in enumerate(symbols)}
        return Domain(sample, (fixed, {str(s): v for s, v in fixed.items()}))


class Levels:
    """A chain of VP levels ``names[0] -> ... -> names[-1]`` (noisiest first), as positive symbols.

    Attributes:
        abar: name -> :math:`\\bar\\alpha` as an expression of the positive symbols.
        symbols: the positive symbols (the cleanest level's r, then the gaps).
        plain: name -> a plain positive symbol ``abar_<name>`` (for displaying a defect).
        domain: the :class:`Domain` of the constraint set.
    """

    def __init__(self, names: Sequence[str], fixed: Optional[Sequence[Fraction]] = None):
        if len(names) < 1:
            raise ValueError("a chain needs at least one level")
        self.names = list(names)
        m = len(names)
        self.r_clean = sp.Symbol(f"r_{names[-1]}", positive=True)
        self.gaps = [sp.Symbol(f"g_{names[i]}", positive=True) for i in range(m - 1)]
        r = {names[-1]: self.r_clean}
        for i in range(m - 2, -1, -1):
            r[names[i]] = r[names[i + 1]] + self.gaps[i]
        self.r = r
        self.abar = {n: 1 / (1 + r[n]) for n in names}
        self.symbols = [self.r_clean, *self.gaps]
        self.plain = {n: sp.Symbol(f"abar_{n}", positive=True) for n in names}
        if fixed is None:
            fixed = [Fraction(i + 1, m + 1) for i in range(m)]  # e.g. 1/3, 2/3 or 1/4, 1/2, 3/4
        self.domain = Domain(self._sample, self._point([Fraction(f) for f in fixed]))

    def _point(self, abars: Sequence[Fraction]) -> Sample:
        if not all(0 < a < 1 for a in abars) or any(b <= a for a, b in zip(abars, abars[1:])):
            raise ValueError(f"levels need 0 < abar_0 < ... < abar_m < 1, got {abars}")
        rs = [(1 - a) / a for a in abars]
        subs = {self.r_clean: sp.Rational(rs[-1].numerator, rs[-1].denominator)}
        for i, g in enumerate(self.gaps):
            d = rs[i] - rs[i + 1]
            subs[g] = sp.Rational(d.numerator, d.denominator)
        shown = {f"abar_{n}": sp.Rational(a.numerator, a.denominator) for n, a in zip(self.names, abars)}
        return subs, shown

    def _sample(self, rng: random.Random) -> Sample:
        vals = sorted(rng.sample(range(1, 1000), len(self.names)))
        return self._point([Fraction(v, 1000) for v in vals])

    def to_plain(self, expr: sp.Expr) -> sp.Expr:
        """Rewrite an expression of the positive symbols in the plain ``abar_*`` symbols."""
        back = {self.r_clean: (1 - self.plain[self.names[-1]]) / self.plain[self.names[-1]]}
        for i, g in enumerate(self.gaps):
            a, b = self.plain[self.names[i]], self.plain[self.names[i + 1]]
            back[g] = (1 - a) / a - (1 - b) / b
        return expr.subs(back)


class EtaInUnitInterval:
    """DDIM's eta as :math:`\\eta = 1/\\sqrt{1+k}`, k > 0, i.e. 0 < eta < 1 (fixed point: eta = 1/2)."""

    def __init__(self):
        self.k = sp.Symbol("k_eta", positive=True)
        self.eta = 1 / sp.sqrt(1 + self.k)
        self.plain = sp.Symbol("eta", positive=True)

        def point(eta: Fraction) -> Sample:
            k = 1 / eta**2 - 1
            shown = {"eta": sp.Rational(eta.numerator, eta.denominator)}
            return {self.k: sp.Rational(k.numerator, k.denominator)}, shown

        self.domain = Domain(lambda rng: point(Fraction(rng.randint(1, 99), 100)), point(Fraction(1, 2)))


class LambdaLevels:
    r"""A chain of levels ``names[0] -> ... -> names[-1]`` (noisiest first) in :math:`\lambda = \log(\alpha/\sigma)`.

    :math:`\lambda` grows along the chain: the first level's is a real symbol ``lambda_<name>``, each next
    one adds a positive gap ``h_<name>`` (named after the level it starts from: DPM-Solver's h of the
    step out of that level). Each level also gets a positive symbol ``q_<name>`` :math:`= e^\lambda =
    \alpha/\sigma`, from which its interpolant is built without logarithms:

    * ``"vp"``:   ``level`` is :math:`\bar\alpha = q^2/(1+q^2)` (what the VP mirrors take),
      ``(alpha, sigma) = vp_alpha_sigma(abar)``;
    * ``"flow"``: ``level`` is :math:`t = 1/(1+q)`, ``(alpha, sigma) = flow_alpha_sigma(t)``;
    * ``"ve"``:   ``level`` is :math:`\sigma = 1/q`, ``(alpha, sigma) = ve_alpha_sigma(sigma)`` (alpha = 1);
    * ``"any"``:  alpha a free positive symbol ``alpha_<name>`` and :math:`\sigma = \alpha/q`, i.e. every
      interpolant (``level`` is None).

    Attributes:
        lam, q, level, alpha, sigma: name -> expression; symbols: the free symbols of the chain;
        domain: the :class:`Domain`: increasing rational q's (fixed: q = 1/3, 1, 3 for three levels,
        abar = 1/10, 1/2, 9/10 on VP) with :math:`\lambda = \log q` exactly (alpha = 1/2, 1/3, ... for "any").
    """

    def __init__(self, names: Sequence[str], interpolant: str = "vp"):
        if interpolant not in ("vp", "flow", "ve", "any"):
            raise ValueError(f"interpolant must be 'vp', 'flow', 've' or 'any', got {interpolant!r}")
        self.names, self.interpolant = list(names), interpolant
        self.q = {n: sp.Symbol(f"q_{n}", positive=True) for n in names}
        self.lam0 = sp.Symbol(f"lambda_{names[0]}", real=True)
        self.gaps = {n: sp.Symbol(f"h_{n}", positive=True) for n in names[:-1]}
        self.lam = {names[0]: self.lam0}
        for a, b in zip(names, names[1:]):
            self.lam[b] = self.lam[a] + self.gaps[a]
        self.level: Dict[str, Any] = {}
        self.alpha: Dict[str, Any] = {}
        self.sigma: Dict[str, Any] = {}
        for n in names:
            q = self.q[n]
            if interpolant == "vp":
                self.level[n] = q**2 / (1 + q**2)
                self.alpha[n], self.sigma[n] = C.vp_alpha_sigma(self.level[n])
            elif interpolant == "flow":
                self.level[n] = 1 / (1 + q)
                self.alpha[n], self.sigma[n] = C.flow_alpha_sigma(self.level[n])
            elif interpolant == "ve":
                self.level[n] = 1 / q
                self.alpha[n], self.sigma[n] = C.ve_alpha_sigma(self.level[n])
            else:
                self.level[n] = None
                self.alpha[n] = sp.Symbol(f"alpha_{n}", positive=True)
                self.sigma[n] = self.alpha[n] / q
        self.symbols = [self.lam0, *self.gaps.values(), *self.q.values()]
        if interpolant == "any":
            self.symbols += [self.alpha[n] for n in names]
        m = len(names)
        self.domain = Domain(self._sample, self._point([Fraction(i + 1, m - i) for i in range(m)]))

    def _point(self, qs: Sequence[Fraction], alphas: Optional[Sequence[Fraction]] = None) -> Sample:
        if not all(q > 0 for q in qs) or any(b <= a for a, b in zip(qs, qs[1:])):
            raise ValueError(f"levels need 0 < q_0 < ... < q_m, got {qs}")
        qv = {n: sp.Rational(q.numerator, q.denominator) for n, q in zip(self.names, qs)}
        subs: Dict[sp.Symbol, sp.Expr] = {self.q[n]: v for n, v in qv.items()}
        subs[self.lam0] = sp.log(qv[self.names[0]])
        for a, b in zip(self.names, self.names[1:]):
            subs[self.gaps[a]] = sp.log(qv[b] / qv[a])
        shown = {f"lambda_{n}": sp.log(v) for n, v in qv.items()}
        if self.interpolant == "any":
            alphas = alphas or [Fraction(1, i + 2) for i in range(len(self.names))]
            for n, a in zip(self.names, alphas):
                subs[self.alpha[n]] = shown[f"alpha_{n}"] = sp.Rational(a.numerator, a.denominator)
        return subs, shown

    def _sample(self, rng: random.Random) -> Sample:
        qs = [Fraction(v, 100) for v in sorted(rng.sample(range(1, 1000), len(self.names)))]
        return self._point(qs, [Fraction(rng.randint(1, 99), 100) for _ in self.names])

    def form(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every logarithm of the chain's positive quantities written in the lambdas and every
        exponential of lambdas in the q's: ``log(alpha/sigma)`` of a level becomes its lambda,
        ``exp(lambda_t - lambda_s)`` becomes ``q_t/q_s``. Raises if a logarithm is left over."""

        def split(log: sp.Expr) -> sp.Expr:
            # log of a product of positive factors (radicands factored first) = the sum of their logs
            arg = log.args[0].replace(_is_root, lambda p: sp.Pow(sp.factor(sp.cancel(sp.together(p.base))), p.exp))
            return sp.expand_log(sp.log(sp.factor(sp.expand_power_base(arg))), force=False)

        e = sp.sympify(expr).replace(lambda a: isinstance(a, sp.log), split)
        e = e.xreplace({sp.log(self.q[n]): self.lam[n] for n in self.names})
        left = [a for a in e.atoms(sp.log) if a.free_symbols]
        if left:
            raise ValueError(f"logarithms not in the lambdas of the chain: {left}")
        base = [self.lam0, *self.gaps.values()]
        # e^{lambda_0} = q_0 and e^{h_a} = q_b/q_a
        value = [self.q[self.names[0]]] + [self.q[b] / self.q[a] for a, b in zip(self.names, self.names[1:])]

        def power(ex: sp.Expr) -> sp.Expr:
            arg = sp.expand(ex.args[0])
            coeffs = [arg.coeff(v) for v in base]
            rest = sp.expand(arg - sum(c * v for c, v in zip(coeffs, base)))
            if any(not c.is_Rational for c in coeffs) or rest.free_symbols & set(base):
                raise ValueError(f"exponential not linear in the lambdas: {ex}")
            out = sp.exp(rest)
            for c, v in zip(coeffs, value):
                out = out * v**c
            return out

        return e.replace(lambda a: isinstance(a, sp.exp), power)


class _Unsupported(Exception):
    """The expression is outside what the exact field method handles (nested radicals, logs...)."""


def _is_root(e: sp.Basic) -> bool:
    return e.is_Pow and e.exp.is_Rational and not e.exp.is_Integer


def _canon_expand(expr: sp.Expr) -> sp.Expr:
    """Fallback zero test: split roots over factored radicands, expand the numerator."""
    e = sp.sympify(expr)
    for _ in range(8):
        new = e.replace(_is_root, lambda p: sp.Pow(sp.factor(sp.cancel(sp.together(p.base))), p.exp))
        new = sp.expand_power_base(new)
        if new == e:
            break
        e = new
    num, _ = sp.fraction(sp.together(e))
    if sp.expand(num) == 0:
        return sp.Integer(0)
    return sp.factor(sp.together(e))


def _canon_field(expr: sp.Expr) -> sp.Expr:
    """Exact zero test in a field of rational functions with one generator per square root.

    Every radicand is factored into a positive rational constant and irreducible polynomials
    (each must be provably positive: then splitting the root over them is valid); each factor f
    gets a generator rho_f with rho_f^2 = f. The expression is evaluated in the field
    Q(symbols, rho), and its numerator reduced modulo rho_f^2 - f. Square roots of distinct
    irreducible polynomials (and of non-square constants) are independent, so the reduced
    numerator is zero exactly when the expression is.
    """
    e = sp.sympify(expr)
    plans: Dict[sp.Expr, Tuple[sp.Rational, List[Tuple[sp.Expr, int]]]] = {}
    atoms: Dict[sp.Expr, sp.Dummy] = {}
    for p in e.atoms(sp.Pow):
        if not _is_root(p):
            continue
        if p.exp.q != 2:
            raise _Unsupported("a root other than a square root")
        if any(_is_root(q) for q in p.base.atoms(sp.Pow)):
            raise _Unsupported("a nested radical")
        if p.base in plans:
            continue
        num, den = sp.fraction(sp.cancel(sp.together(p.base)))
        cn, fn = sp.factor_list(num)
        cd, fd = sp.factor_list(den)
        c = sp.Rational(cn) / sp.Rational(cd)
        facs = [(f, int(k)) for f, k in fn] + [(f, -int(k)) for f, k in fd]
        if c <= 0 or any(f.is_positive is not True for f, _ in facs):
            raise _Unsupported("a radicand not provably positive")
        plans[p.base] = (c, facs)
        for f, _ in facs:
            atoms.setdefault(f, sp.Dummy("rho"))
        if not sp.sqrt(c).is_Rational:
            atoms.setdefault(c, sp.Dummy("rho"))
    syms = sorted(e.free_symbols, key=str)
    rhos = list(atoms.values())
    F, *gens = field(syms + rhos, sp.QQ)
    gen = dict(zip(syms + rhos, gens))
    cache: Dict[sp.Expr, Any] = {}

    def ev(x: sp.Expr):
        if x in cache:
            return cache[x]
        if x.is_Rational:
            out = F(x)
        elif x.is_Symbol:
            out = gen[x]
        elif x.is_Add or x.is_Mul:
            vals = [ev(a) for a in x.args]
            out = vals[0]
            for v in vals[1:]:
                out = out + v if x.is_Add else out * v
        elif x.is_Pow and x.exp.is_Integer:
            out = ev(x.base) ** int(x.exp)
        elif _is_root(x):
            n = int(x.exp.p)  # x = base^(n/2)
            c, facs = plans[x.base]
            out = gen[atoms[c]] ** n if c in atoms else F(sp.sqrt(c) ** n)
            for f, k in facs:
                q, r = divmod(k * n, 2)  # f^(k n / 2) = f^q rho_f^r
                out = out * ev(f) ** q * gen[atoms[f]] ** r
        else:
            raise _Unsupported(f"cannot evaluate {x.func.__name__} exactly")
        cache[x] = out
        return out

    val = ev(e)
    square = {gens[len(syms) + i]: (F(a) if a.is_Rational else ev(a)) for i, a in enumerate(atoms)}
    position = {i: square[g] for i, g in enumerate(gens) if g in square}
    reduced = F(0)
    for monom, coeff in val.numer.terms():
        term = F(coeff)
        for i, k in enumerate(monom):
            if i in position:
                q, r = divmod(k, 2)
                term = term * position[i] ** q * gens[i] ** r
            elif k:
                term = term * gens[i] ** k
        reduced = reduced + term
    if reduced == 0:
        return sp.Integer(0)
    back = {r: sp.sqrt(a) for a, r in atoms.items()}  # a nonzero residual: shown, not simplified further
    return reduced.as_expr().xreplace(back) / val.denom.as_expr().xreplace(back)


def _resolve_abs(expr: sp.Expr) -> sp.Expr:
    """Replace |y| by y or -y where the sign of y is provable on the domain (sympy makes
    sqrt(y^2) into |y| when it cannot see that y > 0, e.g. y = 1 - 1/(1 + r))."""

    def sign_out(a: sp.Abs) -> sp.Expr:
        y = sp.factor(sp.cancel(sp.together(a.args[0])))
        if y.is_nonnegative:
            return y
        if y.is_nonpositive:
            return -y
        return a

    return expr.replace(lambda x: isinstance(x, sp.Abs), sign_out)


def _canon_parameters(expr: sp.Expr) -> sp.Expr:
    expr = _resolve_abs(expr)
    try:
        return _canon_field(expr)
    except _Unsupported:
        return _canon_expand(expr)


def _polynomial_parts(expr: sp.Expr, variables: Sequence[sp.Symbol], max_degree: int = 4):
    """expr as sum of coeff * monomial in ``variables`` (Taylor at 0), or None if not polynomial."""
    if not variables:
        return [(sp.Integer(1), expr)]
    v, rest = variables[0], variables[1:]
    parts, d, k = [], expr, 0
    while d != 0:
        if k > max_degree:
            return None
        sub = _polynomial_parts(d.subs(v, 0) / sp.factorial(k), rest, max_degree)
        if sub is None:
            return None
        parts += [(v**k * m, c) for m, c in sub]
        d, k = sp.diff(d, v), k + 1
    return parts


def canon(expr) -> sp.Expr:
    """Simplified form of a residual; exactly ``0`` when the residual vanishes identically.

    The residual is split into its coefficients as a polynomial in the state symbols (the
    plain real symbols of :func:`real`: x, x0, eps, z...); each coefficient, a function of the
    positive schedule symbols, is tested exactly by the field method (roots of irreducible
    positive factors as independent generators), falling back to splitting roots and expanding.
    """
    e = sp.sympify(expr)
    states = sorted((s for s in e.free_symbols if s.is_nonnegative is None), key=str)
    parts = _polynomial_parts(e, states)
    if parts is None:
        return _canon_parameters(e)
    return sp.Add(*[m * _canon_parameters(c) for m, c in parts])


def fmt_point(shown: Mapping[str, sp.Expr]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in shown.items())


def _value(expr: sp.Expr, subs: Mapping[sp.Symbol, sp.Expr]) -> sp.Expr:
    return sp.N(expr, PRECISION, subs=dict(subs))


def check(
    residuals: Mapping[str, sp.Expr],
    domain: Domain,
    holds_as: Status = Status.PROVED,
    detail: str = "",
    points: int = NUMERIC_POINTS,
    seed: int = 0,
    simplify_failures: bool = False,
) -> Result:
    """Prove that every residual is 0 on the domain, or find a counterexample.

    Arguments:
        residuals: name -> (left side - right side), in the domain's symbols.
        domain: where the claim is made.
        holds_as: the status when all residuals vanish (PROVED or IN_DISTRIBUTION).
        detail: a sentence on what was proved, added to the result.
        points: random points of the numeric fallback.
        simplify_failures: also simplify residuals already seen to be nonzero (a known non-identity,
            whose simplified defect is part of the record). Otherwise a residual that is nonzero at the
            domain's fixed point is not simplified (the exact test of a large nonzero residual, e.g. of a
            mutated coefficient, can take minutes): its recorded "residual" is its value there.

    Returns:
        PROVED / IN_DISTRIBUTION when every residual simplifies to 0; NUMERIC when sympy leaves
        some residual unsimplified but it is below 1e-40 at ``points`` random rational points;
        otherwise FAILS with the largest value found and the point it was found at.
    """
    subs, shown = domain.fixed
    at_fixed = {k: _value(v, subs) for k, v in residuals.items()}
    nonzero = {k: v for k, v in at_fixed.items() if v.is_number and abs(v) >= _ZERO}
    if nonzero and not simplify_failures:  # a counterexample at the readable point: settled without simplifying
        simplified = {k: (v if k in nonzero else canon(residuals[k])) for k, v in at_fixed.items()}
        cx = {"point": dict(shown), "residuals": {k: sp.N(v, 6) for k, v in nonzero.items()}}
        size = ", ".join(f"{k} = {sp.N(v, 4)}" for k, v in nonzero.items())
        note = f"Counterexample at {fmt_point(shown)}: {size} (nonzero there; not simplified)."
        return Result(Status.FAILS, simplified, f"{detail} {note}".strip(), cx)
    simplified = {k: canon(v) for k, v in residuals.items()}
    open_ = [k for k, v in simplified.items() if v != 0]
    if not open_:
        return Result(holds_as, simplified, detail)
    rng = random.Random(seed)
    samples = [domain.fixed] + [domain.sample(rng) for _ in range(points)]
    worst, first_bad = sp.Float(0), None
    for subs, shown in samples:
        vals = {k: _value(residuals[k], subs) for k in open_}
        size = max(abs(v) for v in vals.values())
        worst = max(worst, size)
        if first_bad is None and size >= _ZERO:
            first_bad = (shown, vals)
            break  # the fixed, readable point comes first; one counterexample settles it
    if first_bad is None:
        note = (
            f"sympy left {', '.join(open_)} unsimplified; numerically verified at {len(samples)} points "
            f"({PRECISION} digits), max |residual| = {sp.N(worst, 3)}"
        )
        return Result(Status.NUMERIC, simplified, f"{detail} {note}".strip())
    shown, vals = first_bad
    cx = {"point": dict(shown), "residuals": {k: sp.N(v, 6) for k, v in vals.items()}}
    size = ", ".join(f"{k} = {sp.N(v, 4)}" for k, v in vals.items())
    return Result(Status.FAILS, simplified, f"{detail} Counterexample at {fmt_point(shown)}: {size}.".strip(), cx)
