"""`dpstack demo`: the whole stack end to end on one task (default Lift, state observations).

    dpstack demo [--task lift|can|stack|...] [--out out/demo] [--episodes 100] [--train-steps N]
                 [--eval-episodes 20] [--quick]

The task's row in dpstack/demo/tasks.py names its shipped config, demonstrations,
evaluation episodes and seeds. Stages (each skipped on a rerun when its output is
already there and complete, so an interrupted demo resumes):
  1. collect  scripted-expert demonstrations       -> OUT/data/TASK.zarr
     (with the cameras the config's image keys name, for an image config)
  2. train    with the task's shipped config        -> OUT/train/last.pt (+ loss plot)
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
from dataclasses import dataclass, replace
from pathlib import Path

from dpstack.demo.tasks import DEMO_TASKS, DemoTask
from dpstack.runtime.samplers import DEFAULT_RTI
from dpstack.sim.evaluate import DEFAULT_SEED_BASE

DEFAULT_OUT = Path("out/demo")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run: the task's row (dpstack/demo/tasks.py) with its config's
    network and optimiser settings filled in. Lift's aim at ~15 minutes on 2 CPU cores:
    the small U-Net (~5 M parameters) at 5x DP's learning rate trains ~750 samples/s on 2
    idle cores, so 1000 batch-256 steps take ~6 minutes (DDIM 18/20 after only 500). The
    0.3 M "test" U-Net trains 2-3x faster per sample but plateaus far higher (DDPM 2/20
    after 5000 batch-128 steps)."""

    train_config: str                        # shipped policy/configs/*.yaml
    episodes: int
    train_steps: int
    batch_size: int
    preset: str
    lr: float
    eval_episodes: int
    seed_base: int = DEFAULT_SEED_BASE
    cameras: tuple[str, ...] = ()            # to collect: the config's image keys' cameras
    recovery: float = 0.0                    # to collect: fraction of retry-after-a-missed-grasp demos
    rti_default: str = DEFAULT_RTI           # to export: what bare `rti` runs with the package
    train_eval_every: int = 0                # offline action-error checks during training (0 = off)
    samplers: tuple[str, ...] = ("ddpm", "ddim", "rti", "streaming")
    workers: int = 2
    max_steps: int | None = None
    video: int = 1

    @classmethod
    def for_task(cls, row: DemoTask, quick: bool = False) -> "DemoSettings":
        from dpstack.policy.config import load_config
        from dpstack.sim.env import IMAGE_SUFFIX

        config = load_config(row.train_config)
        s = cls(train_config=row.train_config, episodes=row.episodes,
                train_steps=row.train_steps or config.train.steps, batch_size=config.train.batch_size,
                preset=config.policy.preset, lr=config.train.lr, eval_episodes=row.eval_episodes,
                seed_base=row.seed_base, recovery=row.recovery, rti_default=row.rti_default, cameras=tuple(k.removesuffix(IMAGE_SUFFIX) for k in config.policy.image_keys))
        if quick:  # a smoke run of every stage: a tiny dataset, a few dozen steps of a tiny net
            s = replace(s, episodes=3, train_steps=30, batch_size=16, preset="test", lr=1e-3, eval_episodes=2,
                        max_steps=30)
        return s


def _per_task(field: str) -> str:
    """A default per task, from the task table alone (every dpstack command builds this help, so
    no config is read here), e.g. 'lift 1000, can its config's'."""
    unset = "its config's"
    return ", ".join(f"{name} {getattr(row, field) or unset}" for name, row in DEMO_TASKS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"working folder (default {DEFAULT_OUT})")
    parser.add_argument("--task", default="lift", help=f"task, one of {', '.join(DEMO_TASKS)} (default: lift)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every stage (a minute or two; the "
                        "policy will not succeed)")
    parser.add_argument("--episodes", type=int, default=None, help=f"demonstrations to collect (default: {_per_task('episodes')})")
    parser.add_argument("--train-steps", type=int, default=None, help=f"training steps (default: {_per_task('train_steps')})")
    parser.add_argument("--eval-episodes", type=int, default=None, help=f"evaluation episodes per sampler (default: {_per_task('eval_episodes')})")
    parser.add_argument("--samplers", default=None, help="comma-separated samplers (default ddpm,ddim,rti,streaming)")
    parser.add_argument("--mode", choices=("lockstep", "realtime"), default="lockstep", help="evaluation clock")
    parser.add_argument("--workers", type=int, default=None, help="parallel collectors / simulated arms (default 2)")
    parser.add_argument("--force", action="store_true", help="redo every stage even if its output is there")


def settings_from(args: argparse.Namespace) -> DemoSettings:
    from dpstack.demo.tasks import demo_task
    from dpstack.runtime.samplers import SamplerConfig, split_sampler_names

    s = DemoSettings.for_task(demo_task(args.task), quick=args.quick)
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

    from dpstack.demo.tasks import DEMO_TASKS

    try:
        settings = settings_from(args)
    except ValueError as e:
        print(f"dpstack demo: {e}", file=sys.stderr)
        return 2
    demo = Demo(args.out, settings, task=DEMO_TASKS[args.task].task, mode=args.mode)
    try:
        demo.run(force=args.force)
    except (StageFailed, subprocess.CalledProcessError, RuntimeError) as e:
        print(f"dpstack demo: {e}", file=sys.stderr)
        print("fix the problem and run the same command again: finished stages are kept", file=sys.stderr)
        return 1
    return 0
