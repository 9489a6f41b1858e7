"""Collect scripted-expert demonstrations into a ReplayBuffer dataset.

One seed per episode. Workers (spawned processes) run episodes and send them
back as plain numpy arrays; the parent is the only writer. Episodes are written
in seed order whatever the number of workers, so the same command gives the
same dataset with 1 or 4 workers.

Resuming: `episodes` is the size the dataset should reach. Every kept episode
stores its seed per step (key "seed", committed atomically with the episode),
and the attrs record the seeds tried below `next_seed`, so a resumed run
continues with fresh seeds and never repeats one.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dpstack.sim.tasks import DEFAULT_IMAGE_SIZE, get_task

SEED_KEY = "seed"
SOURCE = "scripted_expert"


@dataclass
class CollectConfig:
    task: str
    episodes: int  # the dataset should hold this many episodes when done
    out: Path
    workers: int = 1
    keep_failed: bool = False
    cameras: tuple[str, ...] = ()
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0  # first seed of a new dataset
    recovery: float = 0.0  # fraction of episodes that start at a missed grasp and show the retry
    progress: bool = True


@dataclass
class CollectResult:
    kept: int = 0
    attempted: int = 0
    succeeded: int = 0
    recoveries: int = 0  # kept episodes that show a retry after a missed grasp
    env_steps: int = 0
    seconds: float = 0.0
    total_episodes: int = 0
    seeds_kept: list[int] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.attempted if self.attempted else float("nan")

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class _Outcome:
    """One finished episode as it travels back from a worker: plain arrays only."""
    seed: int
    success: bool
    steps: dict[str, np.ndarray]
    recovery: bool = False


# ---- episode production -------------------------------------------------------
def _episode(env: Any, seed: int, recovery: float) -> _Outcome:
    from dpstack.sim.experts import run_expert_episode

    ep = run_expert_episode(env, seed, recovery=recovery)
    steps = dict(ep.steps)
    steps[SEED_KEY] = np.full(len(steps["action"]), seed, dtype=np.int64)
    return _Outcome(seed=seed, success=ep.success, steps=steps, recovery=ep.recovery)


def _worker(task: str, cameras: tuple[str, ...], image_size: int, recovery: float, seeds: Any,
            results: Any) -> None:
    from dpstack.sim.env import SimEnv

    try:
        env = SimEnv(task, seed=None, cameras=cameras, image_size=image_size)
        while True:
            seed = seeds.get()
            if seed is None:
                break
            out = _episode(env, seed, recovery)
            results.put(("episode", out.seed, out.success, out.steps, out.recovery))
        env.close()
    except BaseException:  # report, so the parent can stop with the real cause
        results.put(("error", traceback.format_exc()))


def _run_inline(cfg: CollectConfig, seeds: Iterator[int]) -> Iterator[_Outcome]:
    from dpstack.sim.env import SimEnv

    env = SimEnv(cfg.task, seed=None, cameras=cfg.cameras, image_size=cfg.image_size)
    try:
        for seed in seeds:
            yield _episode(env, seed, cfg.recovery)
    finally:
        env.close()


def _run_workers(cfg: CollectConfig, seeds: Iterator[int]) -> Iterator[_Outcome]:
    """Episodes from `cfg.workers` spawned processes, yielded in seed order."""
    ctx = mp.get_context("spawn")
    seed_q, result_q = ctx.Queue(), ctx.Queue()
    args = (cfg.task, cfg.cameras, cfg.image_size, cfg.recovery, seed_q, result_q)
    procs = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(cfg.workers)]
    for p in procs:
        p.start()
    order: list[int] = []  # dispatched seeds, in order
    ready: dict[int, _Outcome] = {}
    try:
        for _ in range(2 * cfg.workers):  # keep each worker busy without running far ahead
            s = next(seeds, None)
            if s is None:
                break
            seed_q.put(s)
            order.append(s)
        while order:
            while order[0] not in ready:
                try:
                    msg = result_q.get(timeout=5.0)
                except queue.Empty:
                    if not all(p.is_alive() for p in procs):
                        raise RuntimeError("a collection worker died without reporting an error")
                    continue
                if msg[0] == "error":
                    raise RuntimeError(f"collection worker failed:\n{msg[1]}")
                _, seed, success, steps, recovery = msg
                ready[seed] = _Outcome(seed, success, steps, recovery)
            yield ready.pop(order.pop(0))
            s = next(seeds, None)
            if s is not None:
                seed_q.put(s)
                order.append(s)
    finally:
        for _ in procs:
            seed_q.put(None)
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join()


# ---- the dataset side -----------------------------------------------------------
def _open_or_create(cfg: CollectConfig) -> tuple[Any, dict[str, Any]]:
    from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer
    from dpstack.sim.env import SimEnv

    task = get_task(cfg.task)
    expert = task.expert_class().__name__  # raises, naming the tasks that have one, before anything is written
    if cfg.out.exists():
        rb = ReplayBuffer.open(cfg.out, mode="a")
        attrs = rb.attrs
        if attrs is None or attrs.source != SOURCE:
            raise ValueError(f"{cfg.out}: exists and is not a scripted-expert dataset; choose another --out")
        if attrs.task != task.name:
            raise ValueError(f"{cfg.out}: holds task {attrs.task!r}, not {task.name!r}")
        want = {o.key for o in attrs.spec.observations if o.is_image}
        have = {f"{c}_image" for c in cfg.cameras}
        if want != have:
            raise ValueError(f"{cfg.out}: was collected with cameras {sorted(want) or 'none'}, "
                             f"this run asks for {sorted(have) or 'none'}; use the same --cameras")
        if attrs.extra.get("expert") not in (None, expert):
            raise ValueError(f"{cfg.out}: collected by expert {attrs.extra.get('expert')!r}, not {expert!r}")
        stored = float(attrs.extra.get("recovery", 0.0))
        if stored != cfg.recovery:
            raise ValueError(f"{cfg.out}: was collected with --recovery {stored:g}, this run asks for "
                             f"{cfg.recovery:g}; use the same --recovery")
        return rb, dict(attrs.extra)
    # A short-lived env only to read the spec this task publishes with these cameras.
    with SimEnv(task, seed=0, cameras=cfg.cameras, image_size=cfg.image_size) as env:
        spec = env.spec
    extra = {"expert": expert, "seed_start": int(cfg.seed), "next_seed": int(cfg.seed),
             "failed_seeds": [], "keep_failed": bool(cfg.keep_failed), "recovery": float(cfg.recovery)}
    rb = ReplayBuffer.create(cfg.out, DatasetAttrs(task=task.name, control_hz=task.control_hz, spec=spec,
                                                   source=SOURCE, extra=extra))
    return rb, extra


def _stored_seeds(rb: Any) -> set[int]:
    if rb.n_episodes == 0 or SEED_KEY not in rb.keys:
        return set()
    seeds = rb.load([SEED_KEY])[SEED_KEY]
    return {int(s) for s in np.unique(seeds)}


def _fresh_seeds(start: int, skip: set[int]) -> Iterator[int]:
    s = start
    while True:
        if s not in skip:
            yield s
        s += 1


def collect(cfg: CollectConfig) -> CollectResult:
    from tqdm import tqdm

    if cfg.episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {cfg.episodes}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be at least 1, got {cfg.workers}")
    if not 0.0 <= cfg.recovery <= 1.0:  # also refuses NaN
        raise ValueError(f"recovery must be a fraction in [0, 1], got {cfg.recovery}")
    rb, extra = _open_or_create(cfg)
    stored = _stored_seeds(rb)
    failed = set(int(s) for s in extra.get("failed_seeds", []))
    next_seed = int(extra.get("next_seed", cfg.seed))
    result = CollectResult(total_episodes=rb.n_episodes)
    if rb.n_episodes >= cfg.episodes:
        return result

    tried = stored | failed  # seeds at or above next_seed that already have an outcome
    seeds = _fresh_seeds(next_seed, tried)
    produce = _run_inline if cfg.workers == 1 else _run_workers
    bar = tqdm(total=cfg.episodes, initial=rb.n_episodes, desc=f"collect {cfg.task}", unit="ep",
               disable=not cfg.progress, file=sys.stderr)
    start = time.perf_counter()
    try:
        for out in produce(cfg, seeds):
            result.attempted += 1
            result.succeeded += int(out.success)
            result.env_steps += len(out.steps["action"])
            if out.success or cfg.keep_failed:
                rb.add_episode(out.steps)
                result.kept += 1
                result.recoveries += int(out.recovery)
                result.seeds_kept.append(out.seed)
            else:
                failed.add(out.seed)
            tried.add(out.seed)
            while next_seed in tried:  # every seed below next_seed has an outcome
                next_seed += 1
            extra.update(next_seed=next_seed, failed_seeds=sorted(failed))
            rb.set_attrs(_with_extra(rb.attrs, extra))
            bar.set_postfix(success=f"{result.succeeded}/{result.attempted}", refresh=False)
            bar.n = rb.n_episodes
            bar.refresh()
            if rb.n_episodes >= cfg.episodes:
                break
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        result.total_episodes = rb.n_episodes
    return result


def _with_extra(attrs: Any, extra: dict[str, Any]) -> Any:
    from dataclasses import replace
    return replace(attrs, extra=dict(extra))


def summary(cfg: CollectConfig, r: CollectResult) -> str:
    return (f"{cfg.task}: kept {r.kept} of {r.attempted} episodes attempted "
            f"(expert success {r.succeeded}/{r.attempted} = {100 * r.success_rate:.1f}%"
            f"{f'; {r.recoveries} kept show a retry after a missed grasp' if r.recoveries else ''}), "
            f"dataset now holds {r.total_episodes} episodes at {cfg.out}; "
            f"{r.env_steps} env steps in {r.seconds:.1f} s = {r.steps_per_second:.0f} steps/s "
            f"with {cfg.workers} worker(s)")
