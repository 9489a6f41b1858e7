"""`dpstack demo`: the whole stack end to end on the default task (Lift, state observations).

    dpstack demo [--out out/demo] [--episodes 100] [--train-steps N] [--eval-episodes 20] [--quick]

Stages (each skipped on a rerun when its output is already there and complete,
so an interrupted demo resumes):
  1. collect  scripted-expert demonstrations       -> OUT/data/lift.zarr
  2. train    the small 1-D U-Net                   -> OUT/train/last.pt (+ loss plot)
  3. export   to an ONNX policy package              -> OUT/policy/
  4. serve + evaluate every sampler in closed loop   -> OUT/eval/results.json
     (a `dpstack serve` process per sampler, simulated arms as `dpstack sim` processes)
  5. report   table, plots and one rollout video     -> OUT/report/

Every stage runs the same `dpstack` command a user would type, as a subprocess.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path("out/demo")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run. The defaults aim at ~15 minutes on 2 CPU cores."""

    episodes: int = 200
    # The small U-Net (64-128-256 channels, ~5 M parameters) at 5x DP's learning rate:
    # ~750 samples/s on 2 idle cores, so 1000 batch-256 steps take ~6 minutes. Measured on
    # Lift: DDIM 18/20 after only 500 such steps. The 0.3 M "test" U-Net trains 2-3x faster
    # per sample but plateaus far higher (DDPM 2/20 after 5000 batch-128 steps).
    train_steps: int = 1000
    batch_size: int = 256
    preset: str = "small"
    lr: float = 5e-4
    train_config: str = "lift_state_small"   # shipped policy/configs/*.yaml
    train_eval_every: int = 0                # offline action-error checks during training (0 = off)
    eval_episodes: int = 20
    samplers: tuple[str, ...] = ("ddpm", "ddim", "rti", "streaming")
    workers: int = 2
    max_steps: int | None = None
    video: int = 1

    @classmethod
    def quick(cls) -> "DemoSettings":
        # A smoke run of every stage: a tiny dataset, a few dozen steps of a tiny net.
        return cls(episodes=3, train_steps=30, batch_size=16, preset="test", lr=1e-3, eval_episodes=2, max_steps=30)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"working folder (default {DEFAULT_OUT})")
    parser.add_argument("--task", default="lift", help="task (default: lift)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every stage (a minute or two; the "
                        "policy will not succeed)")
    parser.add_argument("--episodes", type=int, default=None, help="demonstrations to collect (default 200)")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default 1000)")
    parser.add_argument("--eval-episodes", type=int, default=None, help="evaluation episodes per sampler (default 20)")
    parser.add_argument("--samplers", default=None, help="comma-separated samplers (default ddpm,ddim,rti,streaming)")
    parser.add_argument("--mode", choices=("lockstep", "realtime"), default="lockstep", help="evaluation clock")
    parser.add_argument("--workers", type=int, default=None, help="parallel collectors / simulated arms (default 2)")
    parser.add_argument("--force", action="store_true", help="redo every stage even if its output is there")


def settings_from(args: argparse.Namespace) -> DemoSettings:
    from dataclasses import replace

    from dpstack.runtime.samplers import SamplerConfig, split_sampler_names

    s = DemoSettings.quick() if args.quick else DemoSettings()
    over = {}
    if args.episodes is not None:
        over["episodes"] = args.episodes
    if args.train_steps is not None:
        over["train_steps"] = args.train_steps
    if args.eval_episodes is not None:
        over["eval_episodes"] = args.eval_episodes
    if args.samplers:
        over["samplers"] = split_sampler_names(args.samplers)
    if args.workers is not None:
        over["workers"] = args.workers
    s = replace(s, **over)
    for name in ("episodes", "train_steps", "eval_episodes", "workers"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in s.samplers:  # refused now, not after collecting and training
        SamplerConfig.parse(name)
    return s


def run(args: argparse.Namespace) -> int:
    from dpstack.demo.pipeline import Demo
    from dpstack.demo.stages import StageFailed

    from dpstack.sim.tasks import get_task

    try:
        settings = settings_from(args)
        get_task(args.task)
    except ValueError as e:
        print(f"dpstack demo: {e}", file=sys.stderr)
        return 2
    demo = Demo(args.out, settings, task=args.task, mode=args.mode)
    try:
        demo.run(force=args.force)
    except (StageFailed, subprocess.CalledProcessError, RuntimeError) as e:
        print(f"dpstack demo: {e}", file=sys.stderr)
        print("fix the problem and run the same command again: finished stages are kept", file=sys.stderr)
        return 1
    return 0
