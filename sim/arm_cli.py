"""`dpstack sim`: run a simulated arm against a policy server.

    dpstack sim --task lift --connect tcp://127.0.0.1:5555 --mode lockstep --episodes 10 --seed 10000
    dpstack sim --task lift --connect tcp://127.0.0.1:5555 --policy out/policy   # an image policy: its cameras

The robosuite env is the robot: it opens a session with its RobotSpec, resets
the server's policy at every episode and sends an observation every control
step, as a real arm's bridge does. Writes per-episode records (success, steps,
per-step latency, deadline misses) to --out as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpstack.core.stats import format_ms, summarize_ms
from dpstack.runtime import realtime
from dpstack.sim.arm import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="lift", help="registered task (default: lift)")
    parser.add_argument("--connect", default="tcp://127.0.0.1:5555", help="policy server endpoint")
    parser.add_argument("--mode", choices=MODES, default="lockstep",
                        help="lockstep: wait for every reply (exact evaluation); realtime: step on the wall clock")
    parser.add_argument("--hz", type=float, default=None,
                        help="realtime wall-clock rate (default: the task's control rate; lower = slow motion)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes to run (default 1)")
    parser.add_argument("--seed", type=int, default=10_000, help="episode i uses seed + i")
    parser.add_argument("--max-steps", type=int, default=None, help="episode length limit (default: the task's)")
    parser.add_argument("--robot-id", default="sim-arm", help="name this arm gives the server (default: sim-arm)")
    parser.add_argument("--policy", type=Path, default=None, metavar="DIR",
                        help="the policy package the server serves: render the cameras its spec reads, at its image size")
    parser.add_argument("--cameras", default="",
                        help="comma-separated cameras to render at the task's image size, when there is no --policy")
    parser.add_argument("--extra-latency-ms", type=float, default=0.0, metavar="MS",
                        help="hold every answer back this long (robot time) before the arm gets it; lockstep: rounded up "
                             "to whole control periods")
    parser.add_argument("--reply-timeout", type=float, default=30.0, help="seconds before a missing reply fails the run")
    parser.add_argument("--action-deadline", type=float, default=0.8,
                        help="realtime: fraction of the period to wait for a chunk before holding")
    parser.add_argument("--fresh-deadline", type=float, default=0.5,
                        help="realtime: fraction of the period to wait for a replan (RTI) chunk before running the look-ahead")
    parser.add_argument("--video", type=int, default=0, metavar="N", help="record the first N episodes to MP4")
    parser.add_argument("--video-dir", type=Path, default=None,
                        help="where the MP4s go (default: videos/ next to --out, else ./videos)")
    parser.add_argument("--trace-dir", type=Path, default=None, metavar="DIR",
                        help="write a step-by-step trace (JSON and plot) of every episode here, to see why a seed fails")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the episode records here (JSON), rewritten after every episode")
    parser.add_argument("--resume", action="store_true",
                        help="keep the episodes --out already holds from the same run (task, mode, rate, seeds, "
                             "delay, sampler) and run only the rest")
    parser.add_argument("--quiet", action="store_true", help="no per-episode lines")
    realtime.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not realtime.apply_from_args(args, "dpstack sim"):  # before any thread starts: threads inherit it
        return 2
    from dpstack.sim.arm import ArmConfig, ArmError, SimArm, package_cameras
    from dpstack.sim.eval_report import summarize, write_json_atomic

    finished = []  # every finished episode, written to --out as soon as it ends

    def write() -> None:
        if args.out is not None and finished:
            write_json_atomic(args.out, {"config": run_key(args) | {"connect": args.connect, "hz": arm.hz,
                                                                     "scheduling": realtime.current_scheduling()},
                                         "summary": summary().to_dict(),
                                         "episodes": [r.to_dict() for r in finished]})

    def summary():
        return summarize(config.sampler_label or finished[0].sampler or "policy", finished, config.mode, arm.hz)

    def on_episode(r) -> None:
        finished.append(r)
        write()
        if not args.quiet:
            lat = summarize_ms(r.chunk_latency_ms)
            print(f"episode {r.episode} seed {r.seed}: {'success' if r.success else 'failure'} in {r.steps} steps, "
                  f"{lat['n']} chunks, chunk latency p50 {format_ms(lat['p50_ms'], '.1f')} ms, "
                  f"deadline misses {r.deadline_misses}", flush=True)

    video_dir = args.video_dir or (args.out.parent / "videos" if args.out else Path("videos"))
    try:
        cameras, image_size = tuple(c for c in args.cameras.split(",") if c), None
        if args.policy is not None:
            if cameras:
                raise ValueError("give --policy (its cameras are taken from its spec) or --cameras, not both")
            cameras, image_size = package_cameras(args.policy)
        if args.resume:
            if args.out is None:
                raise ValueError("--resume needs --out: the file that holds the finished episodes")
            finished.extend(kept_episodes(args.out, run_key(args)))
        config = ArmConfig(task=args.task, connect=args.connect, mode=args.mode, hz=args.hz, episodes=args.episodes,
                           seed=args.seed, first_episode=len(finished), max_steps=args.max_steps, robot_id=args.robot_id,
                           cameras=cameras, image_size=image_size, extra_latency_s=args.extra_latency_ms / 1e3,
                           reply_timeout_s=args.reply_timeout, action_deadline=args.action_deadline,
                           fresh_deadline=args.fresh_deadline,
                           video_episodes=args.video, video_dir=video_dir if args.video else None,
                           trace_dir=args.trace_dir)
        arm = SimArm(config, progress=on_episode)  # refuses a camera the task cannot render
    except (ValueError, KeyError) as e:
        print(f"dpstack sim: {e}", file=sys.stderr)
        return 2

    try:
        if finished and len(finished) < args.episodes:
            check_same_sampler(arm, finished)
            print(f"dpstack sim: resuming after the {len(finished)} finished episodes in {args.out}", file=sys.stderr)
        if len(finished) < args.episodes:
            arm.run()
    except ArmError as e:
        print(f"dpstack sim: {e}", file=sys.stderr)
        return 1
    finally:  # also on Ctrl-C: what finished is already in --out
        arm.close()
        if args.out is not None and finished and len(finished) < args.episodes:
            print(f"dpstack sim: kept the {len(finished)} finished episodes of {args.episodes} in {args.out}",
                  file=sys.stderr)
    write()  # a resumed run with nothing left still gets its file rewritten, with this run's config
    result = summary().to_dict()
    print(json.dumps({k: result[k] for k in ("sampler", "sampler_resolved", "episodes", "success_rate",
                                                         "step_latency", "chunk_latency", "deadline_misses")}),
          flush=True)
    return 0


def run_key(args: argparse.Namespace) -> dict:
    """What makes two runs' episodes interchangeable: --resume keeps episodes only from the same key."""
    return {"task": args.task, "mode": args.mode, "hz_requested": args.hz, "seed": args.seed, "episodes": args.episodes,
            "max_steps": args.max_steps, "extra_latency_ms": args.extra_latency_ms}


def kept_episodes(out: Path, key: dict) -> list:
    """The finished episodes in `out` when it is a record of the same run, else none.
    They must be the run's first episodes, in order, as an interrupted run leaves them."""
    from dpstack.sim.eval_report import EpisodeRecord

    try:
        data = json.loads(out.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ValueError(f"{out}: cannot resume from it ({e}); remove it to start over") from None
    config = data.get("config", {}) if isinstance(data, dict) else {}
    differ = sorted(k for k, v in key.items() if config.get(k) != v)
    if differ:
        raise ValueError(f"{out}: holds a different run ({', '.join(differ)} differ); remove it or choose another --out")
    records = [EpisodeRecord.from_dict(d) for d in data.get("episodes", [])]
    if [(r.episode, r.seed) for r in records] != [(i, key["seed"] + i) for i in range(len(records))]:
        raise ValueError(f"{out}: its episodes are not this run's first ones in order; remove it to start over")
    return records[: key["episodes"]]


def check_same_sampler(arm, finished: list) -> None:
    """A resumed run must talk to the sampler that produced its kept episodes."""
    from dpstack.sim.arm import ArmError

    arm.connect()
    kept = {r.sampler for r in finished}
    if kept != {arm.config.sampler_label}:
        raise ArmError(f"the kept episodes came from sampler {sorted(kept)}, this server runs "
                       f"{arm.config.sampler_label!r}; remove --out to start over")
