"""`dpstack collect`: scripted-expert demonstrations into a dataset (resumable)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpstack.sim.tasks import DEFAULT_IMAGE_SIZE, TASKS

    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="task to collect")
    parser.add_argument("--episodes", type=int, required=True,
                        help="collect until the dataset holds this many episodes (resumes an existing one)")
    parser.add_argument("--out", required=True, type=Path, help="dataset directory (created or appended to)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes running episodes (default 1)")
    parser.add_argument("--keep-failed", action="store_true", help="also store episodes the expert failed")
    parser.add_argument("--cameras", default="",
                        help="comma-separated cameras to record, e.g. agentview,robot0_eye_in_hand (default: state only)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="square image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="first seed of a new dataset (a resumed one continues)")
    parser.add_argument("--recovery", type=float, default=0.0,
                        help="fraction of episodes that start at a deliberately missed grasp (not recorded) and "
                             "show the expert opening, rising and grasping again (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # the old spelling


def run(args: argparse.Namespace) -> int:
    import sys

    from dpstack.core.spec import parse_cameras
    from dpstack.sim.collect import CollectConfig, collect, summary

    try:
        cameras = parse_cameras(args.cameras)
    except ValueError as e:
        print(f"dpstack collect: {e}", file=sys.stderr)
        return 2
    cfg = CollectConfig(task=args.task, episodes=args.episodes, out=args.out, workers=args.workers,
                        keep_failed=args.keep_failed, cameras=cameras, image_size=args.image_size,
                        seed=args.seed, recovery=args.recovery, progress=not args.quiet)
    try:
        result = collect(cfg)
    except ValueError as e:
        print(f"dpstack collect: {e}", file=sys.stderr)
        return 2
    print(summary(cfg, result))
    return 0
