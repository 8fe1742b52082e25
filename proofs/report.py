"""The table ``python -m proofs`` prints: identity, statement in words, result (plain text or Markdown)."""
from __future__ import annotations

import textwrap
from collections import Counter
from typing import List

import sympy as sp

from proofs.display import show
from proofs.registry import Outcome, Status

__all__ = ["result_label", "render_text", "render_markdown", "summary", "render_residuals", "to_json"]

WIDTHS = (34, 54, 26)  # identity, statement, result
INDENT = "    "


def result_label(o: Outcome) -> str:
    """The result column: the status, and whether it is what was expected."""
    st = o.result.status
    if st is Status.FAILS and not o.identity.expect_holds and o.as_expected:
        return "FAILS (known non-identity, as expected)"
    label = st.value
    if not o.as_expected:
        label += " <-- UNEXPECTED" if st is not Status.ERROR else ""
        if st.holds and not o.identity.expect_holds:
            label += " (expected to fail)"
        elif st is Status.FAILS and not o.identity.expect_holds:
            open_ = [k for k, ok in o.result.defect_checks.items() if not ok]
            label += f" (documented defect NOT proved: {', '.join(open_) if open_ else 'none recorded'})"
        elif st is Status.NUMERIC:
            label += " (only numerically: a symbolic identity must be PROVED)"
    return label


def _row(cells: List[str], widths=WIDTHS) -> List[str]:
    cols = [textwrap.wrap(c, w) or [""] for c, w in zip(cells, widths)]
    height = max(len(c) for c in cols)
    lines = []
    for i in range(height):
        parts = [(c[i] if i < len(c) else "").ljust(w) for c, w in zip(cols, widths)]
        lines.append("  ".join(parts).rstrip())
    return lines


def render_residuals(o: Outcome) -> List[str]:
    out = []
    for name, value in o.result.residuals.items():
        out += textwrap.wrap(f"{name}: {show(value)}", sum(WIDTHS), initial_indent=INDENT + "  ",
                             subsequent_indent=INDENT + "    ")
    return out


def render_text(outcomes: List[Outcome], verbose: bool = False) -> str:
    """The plain-text table, grouped by family, with each result's detail under its row."""
    width = sum(WIDTHS) + 2 * (len(WIDTHS) - 1)
    lines = [
        "driffusion proofs: the identities the operators rely on, built from driffusion_core.coefficients",
        f"(sympy {sp.__version__}; VP levels 0 < abar_t < abar_s < abar_u < 1 as abar = 1/(1+r), r > 0)",
        "",
    ]
    lines += _row(["identity", "statement", "result"])
    lines.append("=" * width)
    family = None
    for o in outcomes:
        if o.identity.family != family:
            family = o.identity.family
            if lines[-1] != "=" * width:
                lines.append("")
            lines.append(f"[{family}]")
        lines += _row([o.identity.name, o.identity.statement, result_label(o)])
        if o.result.detail:
            lines += textwrap.wrap(o.result.detail.splitlines()[0] if not verbose else o.result.detail, width - 6,
                                   initial_indent=INDENT + "-> ", subsequent_indent=INDENT + "   ")
        if verbose:
            lines += render_residuals(o)
    lines += ["=" * width, summary(outcomes)]
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(outcomes: List[Outcome]) -> str:
    """The same table in Markdown (for READMEs)."""
    lines = ["| identity | statement | result |", "| --- | --- | --- |"]
    for o in outcomes:
        detail = f"<br>{_md(o.result.detail.splitlines()[0])}" if o.result.detail else ""
        lines.append(f"| `{o.identity.name}` | {_md(o.identity.statement)} | **{_md(result_label(o))}**{detail} |")
    lines += ["", summary(outcomes)]
    return "\n".join(lines)


def summary(outcomes: List[Outcome]) -> str:
    """One paragraph: counts by status, whether everything is as expected, the time taken."""
    counts = Counter(o.result.status for o in outcomes)
    words = {
        Status.PROVED: "proved",
        Status.IN_DISTRIBUTION: "hold in distribution",
        Status.VERIFIED: "verified (exhaustively / bit for bit)",
        Status.NUMERIC: "numerically verified",
        Status.FAILS: "fail",
        Status.ERROR: "raised an error",
    }
    parts = [f"{counts[s]} {w}" for s, w in words.items() if counts[s]]
    known = sum(1 for o in outcomes if o.result.status is Status.FAILS and not o.identity.expect_holds
                and o.as_expected)
    bad = [o.identity.name for o in outcomes if not o.as_expected]
    seconds = sum(o.seconds for o in outcomes)
    head = f"{len(outcomes)} {'identity' if len(outcomes) == 1 else 'identities'}: " + ", ".join(parts)
    if known:
        head += (f" ({known} of them known non-identit{'y' if known == 1 else 'ies'}, failing as expected with "
                 f"the documented defect proved)")
    tail = "All as expected." if not bad else f"NOT AS EXPECTED: {', '.join(bad)}."
    return f"{head}. {tail} ({seconds:.1f} s)"


def to_json(outcomes: List[Outcome]) -> List[dict]:
    """Every outcome as plain data (expressions as strings), for tools and tests."""
    out = []
    for o in outcomes:
        cx = o.result.counterexample
        out.append({
            "name": o.identity.name,
            "family": o.identity.family,
            "statement": o.identity.statement,
            "expect_holds": o.identity.expect_holds,
            "numeric": o.identity.numeric,
            "status": o.result.status.name,
            "holds": o.result.status.holds,
            "as_expected": o.as_expected,
            "residuals": {k: str(v) for k, v in o.result.residuals.items()},
            "detail": o.result.detail,
            "defect_checks": dict(o.result.defect_checks),
            "counterexample": None if cx is None else {
                k: ({kk: str(vv) for kk, vv in v.items()} if isinstance(v, dict) else str(v)) for k, v in cx.items()
            },
            "seconds": round(o.seconds, 3),
        })
    return out
