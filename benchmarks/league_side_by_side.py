"""Two (or more) finished leagues of the same members as one Markdown table, for the README: each member's
kNN top-1 and rank per league, linear top-1, Kendall's tau of the rankings and the pairs ordered differently.

    python benchmarks/league_side_by_side.py Fashion-MNIST=runs/fmnist_k3 MNIST=runs/mnist_k3 [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimscale.report.league import load_league, side_by_side


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("leagues", nargs="+", metavar="TITLE=COMPARE_DIR")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    pairs = []
    for item in args.leagues:
        title, sep, path = item.partition("=")
        if not sep or not title or not path:
            ap.error(f"{item!r}: expected TITLE=COMPARE_DIR")
        pairs.append((title, load_league(path)))
    md = side_by_side(pairs)
    if args.out:
        args.out.write_text(md, encoding="utf-8")
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
