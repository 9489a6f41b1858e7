"""Measure the scripted experts: success over N seeds per task and collection
throughput (env steps per second, state only, one process), written as JSON.

    python -m dpstack.sim.expert_eval --tasks lift,can,stack,square --seeds 100 --out out/expert_eval.json

Tasks run one after another (the machine is small). Episode lengths are
reported too, since users train on these demonstrations.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpstack.core.stats import summarize_ms


def evaluate_task(task: str, seeds: range, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from dpstack.sim.env import SimEnv
    from dpstack.sim.experts import run_expert_episode

    t0 = time.perf_counter()
    env = SimEnv(task, seed=None)
    create_s = time.perf_counter() - t0
    lengths, step_times, failed = [], [], []
    succeeded = 0
    bar = tqdm(seeds, desc=f"expert {task}", unit="ep", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    for seed in bar:
        t = time.perf_counter()
        ep = run_expert_episode(env, seed)
        n = len(ep.steps["action"])
        step_times.append((time.perf_counter() - t) / n)  # per env step, incl. reset and the expert
        lengths.append(n)
        succeeded += int(ep.success)
        if not ep.success:
            failed.append(seed)
        bar.set_postfix(success=f"{succeeded}/{len(lengths)}")
    wall = time.perf_counter() - start
    env.close()
    lengths_a = np.array(lengths)
    return {
        "task": task, "episodes": len(lengths), "successes": succeeded,
        "success_rate": succeeded / len(lengths), "failed_seeds": failed,
        "episode_length": {"mean": float(lengths_a.mean()), "p50": float(np.median(lengths_a)),
                           "min": int(lengths_a.min()), "max": int(lengths_a.max())},
        "env_steps": int(lengths_a.sum()), "wall_s": wall,
        "env_steps_per_s": float(lengths_a.sum() / wall),
        "step_time": summarize_ms(step_times, scale=1e3),
        "env_create_s": create_s,
    }


def main(argv: list[str] | None = None) -> int:
    from dpstack.sim.tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m dpstack.sim.expert_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="lift,can,stack,square", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--seeds", type=int, default=100, help="episodes (seeds 0..N-1) per task")
    p.add_argument("--first-seed", type=int, default=0, help="seed of the first episode (default 0)")
    p.add_argument("--out", type=Path, default=Path("out/expert_eval.json"),
                   help="JSON file collecting every task's results (default %(default)s)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    results = {}
    if args.out.exists():  # one file collects all tasks even when they are run one at a time
        results = json.loads(args.out.read_text()).get("tasks", {})
    for task in tasks:
        r = evaluate_task(task, range(args.first_seed, args.first_seed + args.seeds))
        results[task] = r
        print(f"{task}: success {r['successes']}/{r['episodes']} ({100 * r['success_rate']:.0f}%), "
              f"length mean {r['episode_length']['mean']:.0f} steps, "
              f"{r['env_steps_per_s']:.0f} env steps/s (p50 {r['step_time']['p50_ms']:.1f} ms/step, "
              f"p99 {r['step_time']['p99_ms']:.1f}), failed seeds {r['failed_seeds']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"note": "state only, one process, expert included in step time",
                                    "tasks": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
