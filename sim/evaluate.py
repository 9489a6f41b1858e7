"""Closed-loop evaluation: real policy servers and real simulated arms, as processes.

For each sampler one `dpstack serve` subprocess serves the exported package on
a free loopback port; the episodes are split into jobs, each run by one
`dpstack sim` subprocess (a simulated arm speaking the runtime protocol), at
most `workers` at a time, one sampler's jobs together so that its server batches
their denoiser calls (docs/runtime.md, Serving many robots). Every sampler sees the same episode seeds (a paired
comparison), chosen from seeds the training data never used. The per-episode
records are merged into DIR/results.json, DIR/results.md and a latency plot.
The arms render the cameras the package's spec reads, at its image size.
`extra_latency_ms` repeats every sampler's episodes at each added delay (same
seeds again), for a success-against-delay plot; in lockstep the delay is the only
latency (sim/arm.py), so the curve is exact and the same on any computer.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dpstack.core.files import safe_filename
from dpstack.core.process import ChildFailed, ChildProcess, dpstack_command
from dpstack.core.stats import format_ms
from dpstack.runtime.realtime import RealtimeConfig, available_cpus, format_cpus
from dpstack.runtime.samplers import SamplerConfig
from dpstack.sim.eval_report import (EpisodeRecord, SamplerSummary, delay_plot, delay_table, latency_plot, load_records,
                                     markdown_table, seed_sections, summarize, write_json_atomic)
from dpstack.sim.tasks import get_task

DEFAULT_SAMPLERS = ("ddpm", "ddim", "rti", "streaming")
DEFAULT_SEED_BASE = 10_000
OVERRUN_WARNING = 0.01  # realtime: above this share of simulator overruns, say the world ran slow
# What an evaluation writes into its --out folder; RAW_DIR holds per-sampler episode records.
RESULTS_FILE = "results.json"
RESULTS_TABLE_FILE = "results.md"
LATENCY_PLOT_FILE = "latency.png"
DELAY_PLOT_FILE = "success_vs_delay.png"
RAW_DIR = "raw"
TRACE_DIR = "traces"
RUN_KEY_FILE = "run.json"  # in RAW_DIR: the package and settings the raw records belong to


class EvalError(RuntimeError):
    """A server or an arm process failed; the message carries its last output lines."""


def training_dataset(policy_dir: Path) -> Path | None:
    """The dataset a package was trained on, as its manifest records it (if still there)."""
    from dpstack.runtime.package import MANIFEST

    try:
        source = json.loads((Path(policy_dir) / MANIFEST).read_text()).get("dataset", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source) if source and Path(source).exists() else None


def unseen_seed_base(dataset: Path | None, default: int = DEFAULT_SEED_BASE) -> int:
    """First evaluation seed: `default`, or above every seed the dataset's collection tried."""
    if dataset is None or not Path(dataset).exists():
        return default
    from dpstack.data.replay_buffer import ReplayBuffer

    rb = ReplayBuffer.open(dataset, mode="r")
    used = int((rb.attrs.extra if rb.attrs is not None else {}).get("next_seed", 0))
    return max(default, used)


@dataclass
class EvalConfig:
    policy_dir: Path
    out: Path
    task: str = "lift"
    episodes: int = 50
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    mode: str = "lockstep"
    hz: float | None = None
    workers: int = 2
    video: int = 0
    trace: bool = False   # a step-by-step trace of every episode in OUT/traces (sim/trace.py)
    seed_base: int = DEFAULT_SEED_BASE
    max_steps: int | None = None
    serve_args: tuple[str, ...] = ()   # extra `dpstack serve` options
    # onnxruntime threads per server; 0 = realtime: the cores the arms leave free (at
    # least 1), so physics and policy do not fight over cores; lockstep: 2
    server_threads: int = 0
    # realtime: each arm on a core of its own and the servers on the rest, when there
    # are more cores than arms
    pin: bool = True
    rt_priority: int = 0   # realtime: SCHED_FIFO priority (and locked memory) for arms and servers
    witness: bool = False  # realtime: a jitter witness on every core, to tell platform stalls from our misses
    # realtime: every sampler is evaluated at each of these delays added to the answers' arrival (ms)
    extra_latency_ms: tuple[float, ...] = (0.0,)
    startup_timeout_s: float = 120.0
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.samplers:
            raise ValueError("no samplers to evaluate")
        get_task(self.task)
        for name in self.samplers:  # a typo is refused now, not after every other server has started
            SamplerConfig.parse(name)
        if self.witness and self.mode != "realtime":
            raise ValueError("witness is for realtime mode: lockstep has no deadlines to witness")
        if not 0 <= self.rt_priority <= 99:
            raise ValueError(f"rt_priority must be in 1..99 (0: off), got {self.rt_priority}")
        if self.server_threads < 0:
            raise ValueError(f"server_threads must be >= 0 (0: automatic), got {self.server_threads}")
        if len(set(self.samplers)) != len(self.samplers):
            raise ValueError(f"samplers listed twice: {list(self.samplers)}")
        self.extra_latency_ms = tuple(float(d) for d in self.extra_latency_ms)
        if not self.extra_latency_ms or not all(0 <= d < math.inf for d in self.extra_latency_ms):
            raise ValueError(f"extra latencies must be finite numbers >= 0 ms, got {list(self.extra_latency_ms)}")
        if len(set(self.extra_latency_ms)) != len(self.extra_latency_ms):
            raise ValueError(f"extra latencies listed twice: {list(self.extra_latency_ms)}")


def parse_delays(text: str) -> tuple[float, ...]:
    """'0,50,100' -> (0.0, 50.0, 100.0); ValueError naming a bad entry."""
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"extra latency {part.strip()!r} is not a number of milliseconds") from None
    return tuple(out)


@dataclass
class _Job:
    sampler: str
    first: int      # first episode index of this job
    count: int
    video: int
    out: Path
    delay_ms: float = 0.0  # extra latency of this job's arm
    done: int = 0          # episodes already in `out` from an interrupted run of the same evaluation


def raw_records_path(raw_dir: Path, sampler: str, delay_ms: float) -> Path:
    """Where an evaluation keeps all of one sampler's episode records at one delay."""
    return Path(raw_dir) / (safe_filename(sampler) + (f"_{_delay_dir(delay_ms)}" if delay_ms else "") + ".json")


def write_raw_records(raw_dir: Path, sampler: str, delay_ms: float, records: Sequence[EpisodeRecord]) -> None:
    write_json_atomic(raw_records_path(raw_dir, sampler, delay_ms),
                      {"sampler": sampler, "extra_latency_ms": delay_ms, "episodes": [r.to_dict() for r in records]})


def split_jobs(samplers: Sequence[str], episodes: int, workers: int, video: int, raw_dir: Path,
               delays_ms: Sequence[float] = (0.0,)) -> list[_Job]:
    """Episodes of every sampler (at every delay) cut into about `workers` jobs each, one
    sampler's jobs after another: the arms running at once share their sampler's server,
    which batches them. The first job of a sampler (at the first delay) records its videos."""
    per = max(1, -(-episodes // workers))
    jobs = []
    for s in samplers:
        for i, delay in enumerate(delays_ms):
            for first in range(0, episodes, per):
                count = min(per, episodes - first)
                jobs.append(_Job(s, first, count, min(video, count) if first == 0 and i == 0 else 0,
                                 raw_dir / safe_filename(s) / _delay_dir(delay) / f"episodes_{first:04d}.json", delay))
    return jobs


def _delay_dir(delay_ms: float) -> str:
    """Raw records' subfolder for a delay: none for 0, so runs without delays keep their layout."""
    return f"delay_{delay_ms:g}ms" if delay_ms else ""


def _label(sampler: str, delay_ms: float) -> str:
    return f"{sampler} +{delay_ms:g} ms" if delay_ms else sampler


def _child(argv: list[str], name: str, env: dict[str, str], log_path: Path) -> ChildProcess:
    """A server, arm or witness: its own process group (Ctrl-C reaches only us), every line logged."""
    return ChildProcess(argv, name, env=env, log_path=log_path, keep=40, new_session=True)


def _failure(p: ChildProcess) -> str:
    return f"{p.name} exited with {p.proc.returncode}:\n" + "\n".join(p.lines[-20:])


@dataclass(frozen=True)
class CpuPlan:
    """Where the processes of a realtime evaluation run: arm slot i as arms[i], every server as `server`."""

    arms: tuple[RealtimeConfig, ...]
    server: RealtimeConfig


def plan_cpus(cfg: EvalConfig, cpus: Sequence[int]) -> CpuPlan:
    """Realtime with more cores than arms (and pinning on): a core per arm, the rest for
    the servers, so physics and policy never queue behind each other. Otherwise no pinning."""
    rt = dict(priority=cfg.rt_priority, lock_memory=bool(cfg.rt_priority)) if cfg.mode == "realtime" else {}
    if cfg.mode == "realtime" and cfg.pin and len(cpus) > cfg.workers:
        return CpuPlan(arms=tuple(RealtimeConfig(cpus=(c,), **rt) for c in cpus[:cfg.workers]),
                       server=RealtimeConfig(cpus=tuple(cpus[cfg.workers:]), **rt))
    return CpuPlan(arms=(RealtimeConfig(**rt),) * cfg.workers, server=RealtimeConfig(**rt))


def scheduling_summary(cfg: EvalConfig, cpus: Sequence[int]) -> dict:
    plan = plan_cpus(cfg, cpus)
    return {"arm_cpus": [format_cpus(a.cpus) or "any" for a in plan.arms],
            "server_cpus": format_cpus(plan.server.cpus) or "any", "server_threads": server_threads(cfg, cpus),
            "rt_priority": plan.server.priority, "serve_args": list(cfg.serve_args)}


def server_threads(cfg: EvalConfig, cpus: Sequence[int]) -> int:
    if cfg.server_threads:
        return cfg.server_threads
    if cfg.mode == "realtime":
        return max(1, len(cpus) - cfg.workers)
    return 2


def start_server(cfg: EvalConfig, sampler: str, env: dict[str, str], log_dir: Path, cpus: Sequence[int]) -> ChildProcess:
    argv = dpstack_command("serve", str(cfg.policy_dir), "--sampler", sampler, "--bind", "tcp://127.0.0.1:*",
                           "--threads", str(server_threads(cfg, cpus)), *plan_cpus(cfg, cpus).server.argv(),
                           *cfg.serve_args)
    return _child(argv, f"serve {sampler}", env, log_path=log_dir / f"serve_{safe_filename(sampler)}.log")


def arm_argv(cfg: EvalConfig, job: _Job, endpoint: str, video_dir: Path, scheduling: RealtimeConfig = RealtimeConfig()) -> list[str]:
    argv = dpstack_command("sim", "--task", cfg.task, "--connect", endpoint, "--mode", cfg.mode,
                           "--policy", str(cfg.policy_dir),  # the arm renders the cameras the package reads
                           "--episodes", str(job.count), "--seed", str(cfg.seed_base + job.first),
                           "--robot-id", f"arm-{safe_filename(job.sampler)}-{job.first}", "--out", str(job.out), "--resume",
                           "--quiet", *scheduling.argv())
    if job.delay_ms:
        argv += ["--extra-latency-ms", f"{job.delay_ms:g}"]
    if cfg.hz:
        argv += ["--hz", str(cfg.hz)]
    if cfg.max_steps:
        argv += ["--max-steps", str(cfg.max_steps)]
    if job.video:
        argv += ["--video", str(job.video), "--video-dir", str(video_dir)]
    if cfg.trace:
        argv += ["--trace-dir", str(Path(cfg.out) / TRACE_DIR)]
    return argv


def run_eval(cfg: EvalConfig, log: Callable[[str], None] = print) -> list[SamplerSummary]:
    """Serve every sampler, run all episodes, write results.json/results.md/latency.png."""
    out = Path(cfg.out)
    raw_dir, log_dir, video_dir = out / RAW_DIR, out / "logs", out / "videos"
    for d in (raw_dir, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONUNBUFFERED": "1", **cfg.env}
    # Each process gets one intra-op thread's worth of CPU: several share the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    check_package_cameras(cfg.policy_dir, cfg.task)
    jobs = split_jobs(cfg.samplers, cfg.episodes, cfg.workers, cfg.video, raw_dir, cfg.extra_latency_ms)
    todo = _jobs_to_run(cfg, jobs, raw_dir)
    kept = sum(j.count for j in jobs) - sum(j.count - j.done for j in todo)
    if kept:
        log(f"resuming: {kept} of {sum(j.count for j in jobs)} episodes already done for this package and settings")

    servers: dict[str, ChildProcess] = {}
    witnesses = start_witnesses(cfg, out / "witness", env, log_dir) if cfg.witness and todo else []
    try:
        for s in dict.fromkeys(j.sampler for j in todo):
            servers[s] = start_server(cfg, s, env, log_dir, available_cpus())
        try:
            endpoints = {s: p.wait_ready(cfg.startup_timeout_s)["endpoint"] for s, p in servers.items()}
        except ChildFailed as e:
            raise EvalError(str(e)) from None
        if endpoints:
            log("servers up: " + ", ".join(f"{s} at {e}" for s, e in endpoints.items()))
        if cfg.mode == "realtime":
            log("scheduling: " + ", ".join(f"{k} {v}" for k, v in scheduling_summary(cfg, available_cpus()).items()))
        _run_jobs(cfg, todo, endpoints, list(servers.values()), env, video_dir, log_dir)
    finally:
        for p in [*servers.values(), *witnesses]:
            p.stop()
    witness = read_witness(out / "witness", log)

    summaries = []
    latencies: dict[str, dict[str, list[float]]] = {"per control step (obs -> action)": {},
                                                     "per chunk request (obs sent -> chunk back)": {}}
    for s in cfg.samplers:
        for delay in cfg.extra_latency_ms:
            records = load_records(j.out for j in jobs if j.sampler == s and j.delay_ms == delay)
            for r in records:
                r.episode = r.seed - cfg.seed_base
                r.sampler = s
            records.sort(key=lambda r: r.episode)
            summaries.append(summarize(s, records, cfg.mode, records[0].hz, witness_stalls(witness)))
            step_panel, chunk_panel = latencies.values()
            step_panel[_label(s, delay)] = [x for r in records for x in r.step_latency_ms]
            chunk_panel[_label(s, delay)] = [x for r in records for x in r.chunk_latency_ms]
            write_raw_records(raw_dir, s, delay, records)
    write_results(out, cfg, summaries, latencies, witness)
    for s in summaries:
        steps = s.mean_episode_steps * s.episodes
        if cfg.mode == "realtime" and steps and s.overruns > OVERRUN_WARNING * steps:
            log(f"note: {s.sampler}: the simulator needed longer than the period on {s.overruns} of {steps:.0f} steps; "
                "the simulated world paused meanwhile, so the robot ran slower than real time there "
                "(a slow or busy machine: fewer --workers, or --hz below the task's rate)")
    return summaries


def check_package_cameras(policy_dir: Path, task: str) -> None:
    """EvalError in one sentence when the package reads a camera the task cannot render."""
    from dpstack.sim.arm import package_cameras
    from dpstack.sim.env import check_cameras

    try:
        cameras, _ = package_cameras(policy_dir)
        if cameras:
            check_cameras(task, cameras)
    except (ValueError, KeyError) as e:
        raise EvalError(f"{policy_dir}: {e}") from None


def start_witnesses(cfg: EvalConfig, witness_dir: Path, env: dict[str, str], log_dir: Path) -> list[ChildProcess]:
    """A jitter witness per core, at a priority above the arms' so it sees the platform, not our load.
    Files left by an earlier run are kept: a resumed evaluation checks its old misses against them too."""
    from dpstack.runtime.jitter import one_cpu_command

    witness_dir.mkdir(parents=True, exist_ok=True)
    run = time.strftime("%Y%m%d-%H%M%S")
    priority = min(99, cfg.rt_priority + 1) if cfg.rt_priority else 0
    return [_child(one_cpu_command(c, hz=1000.0, stall_ms=2.0, priority=priority, lock_memory=bool(priority),
                                     out=witness_dir / f"{run}_cpu{c}.json"),
                     f"witness cpu {c}", env, log_path=log_dir / f"witness_cpu{c}.log") for c in available_cpus()]


def witness_stalls(witness: Sequence[dict]) -> list[tuple[float, float]]:
    """(start, ms) of every stall and slowdown the witnesses saw."""
    return [(x[0], x[1]) for w in witness for x in [*w["stalls"], *w.get("slowdowns", ())]]


def read_witness(witness_dir: Path, log: Callable[[str], None] = print) -> list[dict]:
    """Every witness file; an unreadable one is named and skipped (the episodes are what matter)."""
    out = []
    for p in sorted(witness_dir.glob("*_cpu*.json")) if witness_dir.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            log(f"witness file {p} unreadable, left out: {e}")
    return out


def _package_sha256(policy_dir: Path) -> str | None:
    from dpstack.runtime.package import MANIFEST, sha256_file

    manifest = Path(policy_dir) / MANIFEST
    return sha256_file(manifest) if manifest.exists() else None


def _jobs_to_run(cfg: EvalConfig, jobs: list[_Job], raw_dir: Path) -> list[_Job]:
    """Jobs with episodes left to run. Finished episodes are kept only when they come from
    the same package and settings (raw/run.json says which): an interrupted evaluation
    resumes at the episode it was running, and a changed one starts over."""
    run_key = {"package_sha256": _package_sha256(cfg.policy_dir), "task": cfg.task, "mode": cfg.mode,
               "hz": cfg.hz, "max_steps": cfg.max_steps, "seed_base": cfg.seed_base, "episodes": cfg.episodes,
               "workers": cfg.workers, "video": cfg.video} | ({"trace": True} if cfg.trace else {})
    key_path = raw_dir / RUN_KEY_FILE
    try:
        same = json.loads(key_path.read_text()) == run_key
    except (OSError, ValueError):
        same = False
    todo = []
    for job in jobs:
        job.out.parent.mkdir(parents=True, exist_ok=True)
        job.done = _episodes_done(job) if same else 0
        if job.done == job.count:
            continue
        if not job.done:
            job.out.unlink(missing_ok=True)
        todo.append(job)
    write_json_atomic(key_path, run_key)
    return todo


def _episodes_done(job: _Job) -> int:
    try:
        return min(len(json.loads(job.out.read_text())["episodes"]), job.count)
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _run_jobs(cfg: EvalConfig, jobs: list[_Job], endpoints: dict[str, str], servers: Sequence[ChildProcess],
              env: dict[str, str], video_dir: Path, log_dir: Path) -> None:
    from tqdm import tqdm

    pending = list(jobs)
    running: list[tuple[_Job, ChildProcess]] = []
    slots = plan_cpus(cfg, available_cpus()).arms  # scheduling of each arm slot
    busy: dict[int, int] = {}  # id(running arm process) -> its slot
    total = sum(j.count for j in jobs)
    with tqdm(total=total, initial=sum(j.done for j in jobs), desc="episodes", unit="ep", dynamic_ncols=True,
              file=sys.stdout) as bar:
        try:
            while pending or running:
                while pending and len(running) < cfg.workers:
                    job = pending.pop(0)
                    name = f"sim {job.sampler} #{job.first}"
                    slot = min(set(range(cfg.workers)) - set(busy.values()))
                    argv = arm_argv(cfg, job, endpoints[job.sampler], video_dir, slots[slot])
                    p = _child(argv, name, env, log_path=log_dir / f"sim_{safe_filename(job.sampler)}_{job.first:04d}.log")
                    running.append((job, p))
                    busy[id(p)] = slot
                time.sleep(0.2)
                for job, p in list(running):
                    if p.proc.poll() is None:
                        continue
                    p.stop()
                    running.remove((job, p))
                    busy.pop(id(p))
                    if p.proc.returncode != 0 or not job.out.exists():
                        raise EvalError(_failure(p))
                    bar.update(job.count - job.done)
                    done = json.loads(job.out.read_text())["summary"]
                    bar.write(f"{_label(job.sampler, job.delay_ms)}: episodes {job.first}-{job.first + job.count - 1}: "
                              f"success {done['success_rate']:.2f}, chunk latency p50 {format_ms(done['chunk_latency']['p50_ms'], '.1f')} ms")
                for server in servers:
                    if server.proc.poll() is not None:
                        raise EvalError(_failure(server))
        finally:
            for _, p in running:
                p.stop()


def write_results(out: Path, cfg: EvalConfig, summaries: Sequence[SamplerSummary],
                  latencies: dict[str, dict[str, list[float]]], witness: Sequence[dict] = ()) -> None:
    write_json_atomic(out / RESULTS_FILE, {
        "policy": str(cfg.policy_dir), "package_sha256": _package_sha256(cfg.policy_dir),
        "task": cfg.task, "mode": cfg.mode, "hz": summaries[0].hz if summaries else cfg.hz,
        "seed_base": cfg.seed_base, "episodes_per_sampler": cfg.episodes,
        "extra_latency_ms": list(cfg.extra_latency_ms),
        "scheduling": scheduling_summary(cfg, available_cpus()),
        "witness": [{k: w[k] for k in ("cpu", "hz", "seconds", "wakeups", "late")}
                    | {"stalls": len(w["stalls"]), "slowdowns": len(w.get("slowdowns", ()))} for w in witness],
        "results": [s.to_dict() for s in summaries]})
    text = f"# Closed-loop evaluation: {cfg.task}, {cfg.mode}\n\n{markdown_table(summaries)}\n{seed_sections(summaries, cfg.mode)}"
    if len(cfg.extra_latency_ms) > 1:
        text += f"\n## Success against extra latency\n\n{delay_table(summaries)}\n![success against delay]({DELAY_PLOT_FILE})\n"
        delay_plot(summaries, out / DELAY_PLOT_FILE, title=f"{cfg.task}: success against extra latency ({cfg.mode})")
    (out / RESULTS_TABLE_FILE).write_text(text)
    latency_plot(latencies, out / LATENCY_PLOT_FILE, title=f"{cfg.task} latency ({cfg.mode})")


def read_results(out: Path) -> list[dict]:
    path = Path(out) / RESULTS_FILE
    return json.loads(path.read_text())["results"] if path.exists() else []
