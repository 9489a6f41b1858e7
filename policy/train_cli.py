"""`dpstack train --config lift_state_small --dataset PATH --out DIR [--resume] [--track wandb|tensorboard] [--set k=v ...]`

Multi-GPU / multi-node: run this module under torchrun, e.g.
    torchrun --nproc_per_node 4 -m dpstack.policy.train_cli --config lift_state_dp --dataset d.zarr --out runs/x
(see docs/training.md).
"""
from __future__ import annotations

import argparse
import sys

from .train_outputs import CHECKPOINT_FILE, LOSS_PLOT_FILE, METRICS_FILE

DEFAULT_CONFIG = "lift_state_small"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="a shipped config name (policy/configs/*.yaml) or a path to a YAML file "
                             f"(default: {DEFAULT_CONFIG}; with --resume: the checkpoint's own)")
    parser.add_argument("--dataset", required=True, help="dataset (zarr directory or .zarr.zip)")
    parser.add_argument("--out", required=True, help=f"output directory: {CHECKPOINT_FILE}, {METRICS_FILE}, {LOSS_PLOT_FILE}")
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_FILE} at its step")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override config values, e.g. --set train.steps=500 policy.preset=dp")
    parser.add_argument("--track", choices=("wandb", "tensorboard"), default=None,
                        help="also log to Weights & Biases or TensorBoard (the extra of that name); "
                             "the same as --set train.track=NAME")
    parser.add_argument("--quiet", dest="no_progress", action="store_true", help="no progress bar: one log line per logged step")
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help=argparse.SUPPRESS)  # the old spelling


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dpstack.data.replay_buffer import DatasetError

    from .checkpoint import CheckpointError, read_checkpoint
    from .config import Config, ConfigError, apply_overrides, load_config
    from .train import train

    overrides = list(args.overrides) + ([f"train.track={args.track}"] if args.track else [])
    try:
        if args.resume and args.config is None:
            # Without --config the checkpoint's config is the base; --set may change train.* (e.g. more steps).
            saved = read_checkpoint(Path(args.out) / CHECKPOINT_FILE)["config"]
            config = Config.from_dict(apply_overrides(saved, overrides))
        else:
            # train() refuses a --resume whose policy section differs from the checkpoint's.
            config = load_config(args.config or DEFAULT_CONFIG, overrides)
        result = train(config, args.dataset, args.out, resume=args.resume, progress=not args.no_progress,
                       log_lines=args.no_progress)
    except (ConfigError, CheckpointError, DatasetError, FileNotFoundError) as e:
        print(f"dpstack train: {e}", file=sys.stderr)
        return 2
    if result.already_complete:
        # Not a failure: the run the user asked to continue is already done.
        print(f"{args.out} is already complete at step {result.step} (train.steps {config.train.steps}); "
              f"nothing was done. To train further: --resume --set train.steps=N with N > {result.step}")
        return 0
    if result.interrupted and result.step < config.train.steps:
        print(f"dpstack train: stopped at step {result.step}; checkpoint {result.checkpoint} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    loss = "" if result.last_loss is None else f", loss {result.last_loss:.4g}"
    print(f"trained {result.step} steps{loss}; checkpoint {result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpstack train", description="train a diffusion policy on a dataset")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
