"""Readable forms of expressions for the report."""
from __future__ import annotations

import sympy as sp

from proofs.algebra import canon

__all__ = ["show", "nice"]


def show(expr) -> str:
    """``str`` of an expression with ``^`` for powers, terms in the order they were written."""
    return sp.sstr(expr, order="none").replace("**", "^")


def nice(expr: sp.Expr, candidate: sp.Expr) -> str:
    """``candidate`` if it provably equals ``expr`` (a hand-arranged, readable form), else ``expr`` factored.

    The candidate is only a layout: it is shown only when ``canon(expr - candidate) == 0``.
    """
    if canon(expr - candidate) == 0:
        return show(candidate)
    return show(sp.factor(sp.simplify(expr)))
