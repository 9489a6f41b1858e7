"""`dpstack pool DIR [DIR ...]`: one table from evaluations of one package: a sampler's runs on
disjoint seed ranges add up, and samplers run separately on the same seeds are paired.

    dpstack eval policy --task can --seed 10000 --out eval_10000
    dpstack eval policy --task can --seed 20000 --out eval_20000
    dpstack pool eval_10000 eval_20000 --out can_pooled.md

Per sampler: each run's success, the pooled success with its 95% Wilson interval, the
failing seeds, and every pair of samplers compared seed by seed (exact McNemar test).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="`dpstack eval --out` folders of one package")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")


def run(args: argparse.Namespace) -> int:
    from dpstack.sim.eval_pool import PoolError, pool_results, pooled_markdown

    try:
        text = pooled_markdown(pool_results(args.dirs))
    except PoolError as e:
        print(f"dpstack pool: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0
