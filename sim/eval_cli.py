"""`dpstack eval POLICY_DIR`: closed-loop evaluation of an exported policy package.

    dpstack eval out/policy --task lift --episodes 50 --samplers ddpm,ddim,rti,streaming --out out/eval
    dpstack eval out/policy --task can --extra-latency-ms 0,50,100,200 --episodes 30 --out out/delay

Starts one `dpstack serve` process per sampler and runs simulated arms
(`dpstack sim` processes) against them, several in parallel, on episode seeds
the training data never used. Writes OUT/results.json (one record per sampler:
success rate with its 95% Wilson interval, mean episode length, per-step latency
p50/p99, deadline misses), OUT/results.md, OUT/latency.png and, with --video N,
MP4s of the first N episodes of every sampler under OUT/videos/. The arms render the
cameras an image package reads, at its size, from its spec. With
--extra-latency-ms every sampler runs at every delay and OUT/success_vs_delay.png
plots success against delay.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpstack.runtime.samplers import split_sampler_names

DEFAULT_SAMPLERS = "ddpm,ddim,rti,streaming"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy_dir", type=Path, help="exported policy package (dpstack export)")
    parser.add_argument("--task", default="lift", help="registered task (default: lift)")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per sampler")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS,
                        help="comma-separated samplers as `dpstack serve --sampler` takes them (ddpm, ddim-10, rti-3,1,0, "
                             "streaming-1); a bare number continues the rti list before it (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--mode", choices=("lockstep", "realtime"), default="lockstep",
                        help="lockstep: the world waits for every reply (deterministic); realtime: a wall clock at --hz")
    parser.add_argument("--hz", type=float, default=None, help="realtime wall-clock rate (default: the task's)")
    parser.add_argument("--extra-latency-ms", default="0", metavar="MS[,MS...]",
                        help="delays added between observation capture and the answer's arrival (robot "
                             "time); every sampler is evaluated at each, on the same seeds (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="simulated arms running at once")
    parser.add_argument("--video", type=int, default=0, metavar="N", help="MP4s of the first N episodes per sampler")
    parser.add_argument("--trace", action="store_true",
                        help="a step-by-step trace (JSON and plot) of every episode in OUT/traces: rerun a failing "
                             "seed with --seed S --episodes 1 --trace to see why it fails")
    parser.add_argument("--seed", type=int, default=None,
                        help="first episode seed (default: 10000, or above the seeds --dataset's collection used)")
    parser.add_argument("--dataset", type=Path, default=None, help="training dataset, to keep evaluation seeds unseen (default: the one the package's manifest names)")
    parser.add_argument("--max-steps", type=int, default=None, help="episode length limit (default: the task's)")
    parser.add_argument("--threads", dest="server_threads", type=int, default=0, metavar="N",
                        help="onnxruntime threads per policy server, as `dpstack serve --threads` "
                             "(default: realtime, the cores the arms leave free; lockstep, 2)")
    parser.add_argument("--server-threads", dest="server_threads", type=int, help=argparse.SUPPRESS)  # the old spelling
    parser.add_argument("--scheduling", choices=("batched", "serial"), default="batched",
                        help="each server's `dpstack serve --scheduling`: batched runs the arms sharing a sampler "
                             "in one denoiser call; serial one robot at a time (default %(default)s)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="realtime: do not give each arm a core of its own and the servers the rest "
                             "(pinning needs more cores than --workers)")
    parser.add_argument("--witness", action="store_true",
                        help="realtime: run a jitter witness (dpstack bench jitter) on every core and count the "
                             "deadline misses that fell in a platform stall")
    parser.add_argument("--rt-priority", type=int, default=0, metavar="N",
                        help="realtime: run arms and servers at SCHED_FIFO priority N with locked memory "
                             "(needs CAP_SYS_NICE; default: off)")


def run(args: argparse.Namespace) -> int:
    from dpstack.runtime.package import MANIFEST
    from dpstack.sim.evaluate import (RESULTS_FILE, EvalConfig, EvalError, parse_delays, run_eval, training_dataset,
                                      unseen_seed_base)
    from dpstack.sim.eval_report import markdown_table

    if not (args.policy_dir / MANIFEST).is_file():
        print(f"dpstack eval: {args.policy_dir} is not a policy package (no {MANIFEST}); "
              "make one with `dpstack export CHECKPOINT --out DIR`", file=sys.stderr)
        return 2
    try:
        dataset = args.dataset or training_dataset(args.policy_dir)
        seed = args.seed if args.seed is not None else unseen_seed_base(dataset)
        cfg = EvalConfig(policy_dir=args.policy_dir, out=args.out, task=args.task, episodes=args.episodes,
                         samplers=split_sampler_names(args.samplers), mode=args.mode, hz=args.hz, workers=args.workers,
                         video=args.video, trace=args.trace, seed_base=seed, max_steps=args.max_steps, server_threads=args.server_threads,
                         pin=args.pin, rt_priority=args.rt_priority, witness=args.witness,
                         serve_args=("--scheduling", args.scheduling),
                         extra_latency_ms=parse_delays(args.extra_latency_ms))
    except ValueError as e:
        print(f"dpstack eval: {e}", file=sys.stderr)
        return 2
    print(f"evaluating {args.policy_dir} on {args.task}: samplers {', '.join(cfg.samplers)}, {cfg.episodes} episodes "
          f"each (seeds {seed}..{seed + cfg.episodes - 1}), {cfg.mode}, {cfg.workers} arms at once"
          + (f", at extra latencies {', '.join(f'{d:g}' for d in cfg.extra_latency_ms)} ms"
             if any(cfg.extra_latency_ms) else ""), flush=True)
    try:
        summaries = run_eval(cfg)
    except EvalError as e:
        print(f"dpstack eval: {e}", file=sys.stderr)
        return 1
    print(markdown_table(summaries))
    print(f"results in {args.out / RESULTS_FILE}")
    return 0
