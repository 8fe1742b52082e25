"""``python -m benchmarks [--quick] [--out DIR] [--only oracle,digits,...]``: the benchmark suite.

Full run (``make bench``, under 15 minutes on 2 cores): writes ``benchmarks/results/report.md``,
``results.json`` and the PNG plots. ``--quick`` (``make bench-quick``, 40 to 90 s on 2 cores) writes to
``benchmarks/results/quick/`` so the committed full results are never overwritten.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from benchmarks.cli import count, out_dir
from benchmarks.config import SECTIONS, preset


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="The benchmark suite.")
    p.add_argument("--quick", action="store_true", help="small settings, 40 to 90 s on 2 cores (results in results/quick/)")
    p.add_argument("--out", type=out_dir, default=None, help="output folder (default benchmarks/results[/quick])")
    p.add_argument("--only", type=str, default=None,
                   help=f"comma-separated sections to run, from: {','.join(SECTIONS)} (default all)")
    p.add_argument("--threads", type=count(), default=None, help="torch CPU threads (default 2, the reference machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.only is None:
        args.sections = list(SECTIONS)
    else:
        args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in args.sections if s not in SECTIONS]
        if bad or not args.sections:
            p.error(f"--only: unknown section(s) {bad or args.only!r}; choose from {','.join(SECTIONS)}, "
                    f"e.g. --only oracle,latency")
    from benchmarks.runner import RESULTS_DIR, kept_run

    folder = args.out if args.out is not None else (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    clash = kept_run(folder, "quick" if args.quick else "full", args.sections)
    if clash:
        p.error(clash)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from benchmarks.runner import run

    cfg = preset(args.quick)
    if args.threads is not None:
        cfg = cfg.with_(threads=args.threads)
    run(cfg, args.sections, args.out, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
