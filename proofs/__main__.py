"""``python -m proofs``: prove every identity, print the table, exit 1 if anything is not as expected."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from proofs import load, run_all
from proofs.report import render_markdown, render_text, to_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proofs", description=__doc__)
    parser.add_argument("-k", dest="select", default=None, help="only identities whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print every simplified residual")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead")
    parser.add_argument("--list", action="store_true", help="list the identities and exit")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                        help="also write every result (status, residuals, counterexample) to PATH as JSON")
    args = parser.parse_args(argv)
    if args.json_path is not None and not args.json_path.strip():
        parser.error("--json: the path is empty; give a file path, e.g. --json proofs.json")
    if args.json_path:  # checked before the proofs run, not when their results are written
        folder = os.path.dirname(os.path.abspath(args.json_path))
        if os.path.isdir(args.json_path) or not os.path.isdir(folder):
            parser.error(f"--json {args.json_path}: {'a folder' if os.path.isdir(args.json_path) else f'the folder {folder} does not exist'}; "
                         f"give a file path in an existing folder")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            parser.error(f"--json {args.json_path}: cannot write into {folder} ({e.strerror or e})")
    if args.list:
        for ident in load():
            print(f"{ident.name:36s} {'' if ident.expect_holds else '(known non-identity) '}{ident.statement}")
        return 0
    outcomes = run_all(args.select)
    if not outcomes:
        print(f"No identity matches {args.select!r}; see `python -m proofs --list`.", file=sys.stderr)
        return 2
    print(render_markdown(outcomes) if args.markdown else render_text(outcomes, args.verbose))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(to_json(outcomes), f, indent=1)
    return 0 if all(o.as_expected for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
