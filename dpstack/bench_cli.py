"""`dpstack bench NAME ...`: hands over to the benchmark that owns the figures.

Each benchmark is a module with `main(argv) -> int` that prints a table and
writes JSON. They are named here as strings and imported only when run, so the
torch-based ones cost a robot computer nothing.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "latency": ("dpstack.policy.bench_latency", "per-control-step latency of every sampler, onnxruntime vs torch eager"),
    "train": ("dpstack.policy.bench_train", "training throughput in samples per second; --image: the image loader next to the trainer"),
    "fleet": ("dpstack.policy.bench_fleet", "N simulated robots at their control rate against one policy server"),
    "transport": ("dpstack.runtime.bench_transport", "ZeroMQ round trip through a separate server process"),
    "jitter": ("dpstack.runtime.jitter", "how late this computer wakes a sleeping thread, per core (cyclictest)"),
    "servo": ("dpstack.deploy.bench_servo", "servo-loop jitter at 125/500 Hz and bridge observation-to-command latency"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()) + \
        ". Everything after NAME goes to that benchmark (`dpstack bench NAME --help`)."
    parser.add_argument("bench", choices=sorted(BENCHES), metavar="NAME", help=", ".join(sorted(BENCHES)))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.bench][0])
    return int(module.main(list(args.rest)) or 0)


