"""`dpstack bench fleet`: N simulated robots at their control rate against ONE `dpstack serve`.

Each robot is a real `PolicyClient` in its own thread, sending plausible observations
(the package's spec: states inside the normaliser's range, random images) and
executing its chunks with an `ActionSchedule`, the way the simulated arm's realtime
loop does: it asks for the next chunk when the current one (up to its replan point)
is about to run out, early by its recent latency, and a tick with nothing to
execute at its action deadline is a held step. Every robot first gets its
episode's start-up chunk (a full denoise for streaming and RTI); the timed window
then starts for all robots at once.

One server subprocess per (model, sampler, robots, scheduling). `--scheduling A,B`
passes `--scheduling A` (then B) to `dpstack serve` so the modes are compared side
by side in one run; `--serve-args` goes to every server as typed. `--soak` samples
the server's memory (VmRSS) every `--sample-s` seconds and reports held steps,
chunk p99 and memory per interval, and restarts (a server that died is started
again on the same endpoint; the robots reconnect).

It lives in policy/ because `--models` builds random-weight packages with torch
(policy/bench_latency.py); with `--package` no torch is loaded.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpstack.core.process import EXIT_INTERRUPTED, ChildFailed, ChildProcess, dpstack_command
from dpstack.core.stats import Summary, format_ms, summarize_ms

RECENT_CHUNKS = 20        # latencies the request lead looks back on (as the simulated arm)
ACTION_DEADLINE = 0.8     # a tick waits for a chunk until this fraction of its period, then holds
START_TIMEOUT_S = 600.0   # server ready (package load + start-up measurement) and each robot's first chunk
REPLY_TIMEOUT_S = 2.0     # a chunk unanswered this long: the robot's link reconnects (as PolicyClient's timeout)
NOT_STARTED = "another robot failed to start"
# The server's stats key for the batch sizes it ran: a dpstack.core.stats summary over its denoiser calls.
BATCH_KEY = "batch"


class FleetError(RuntimeError):
    """The benchmark cannot go on; the message is one sentence that names the fix."""


@dataclass
class RobotResult:
    robot: str
    ticks: int
    held_steps: int
    chunks: int
    chunk_latency: Summary
    reconnects: int
    errors: dict[str, int]


@dataclass
class FleetRun:
    model: str
    sampler: str
    scheduling: str           # "default": no --scheduling passed
    robots: int
    hz: float
    seconds: float
    serve_args: list[str]
    robot_results: list[RobotResult]
    batch: dict[str, Any] | None   # the server's batch-size summary; None: it does not report one
    server_restarts: int
    rss_mb: list[list[float | None]]     # [seconds since start, server VmRSS MB]
    intervals: list[dict[str, Any]] = field(default_factory=list)  # soak: one row per --sample-s
    server_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def held_steps(self) -> int:
        return sum(r.held_steps for r in self.robot_results)

    @property
    def worst_p99_ms(self) -> float | None:
        values = [r.chunk_latency["p99_ms"] for r in self.robot_results if r.chunk_latency["n"]]
        return max(values) if values else None


# -- one robot -----------------------------------------------------------------------------------------

class SimulatedRobot:
    """One robot: its own PolicyClient and ActionSchedule, driven by its own thread."""

    def __init__(self, endpoint: str, spec, robot_id: str, pool: list[dict[str, np.ndarray]], hz: float,
                 seed: int) -> None:
        self.endpoint, self.spec, self.robot_id, self.pool, self.hz, self.seed = endpoint, spec, robot_id, pool, hz, seed
        self.dt = 1.0 / spec.control_hz   # robot seconds per tick: the chunk times are in these
        self.ticks = 0
        self.held_at: list[float] = []                 # wall time of every held tick
        self.latencies: list[tuple[float, float]] = []  # (wall time answered, ms)
        self.failure: str | None = None
        self.stats: dict[str, Any] | None = None
        self.reconnects = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self._asked: dict[int, float] = {}
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_CHUNKS)

    def run(self, start: threading.Barrier, clock: dict[str, float], stop: threading.Event, want_stats: bool) -> None:
        from dpstack.runtime.action_schedule import ActionSchedule
        from dpstack.runtime.client import PolicyClient

        # The start-up chunks of all robots queue on one server: each robot waits for its own as
        # long as it takes, rather than reconnecting (which would start its start-up again).
        client = PolicyClient(self.endpoint, self.spec, self.robot_id, seed=self.seed, timeout_s=START_TIMEOUT_S)
        schedule = ActionSchedule(self.spec.action)
        try:
            reply = client.request(self.pool[0], 0.0, START_TIMEOUT_S)  # the episode's start-up chunk
            if reply is None:
                errors = "; ".join(f"{e.code}: {e.message}" for e in list(client.errors)[-2:])
                self.failure = client.refusal() or (f"robot {self.robot_id} got no start-up chunk from {self.endpoint}"
                                                    + (f" ({errors})" if errors else ""))
                start.abort()
                return
            client.timeout_s = REPLY_TIMEOUT_S
            schedule.offer(reply)
            start.wait(START_TIMEOUT_S)
            self._loop(client, schedule, clock["start"], stop)
            if want_stats:
                self.stats = dict(client.request_stats(5.0) or {})
        except threading.BrokenBarrierError:
            self.failure = self.failure or NOT_STARTED
        finally:
            self.reconnects = client.n_reconnects
            self.errors.update(e.code for e in client.errors)
            client.close()

    def _loop(self, client, schedule, start_wall: float, stop: threading.Event) -> None:
        k = 0
        while not stop.is_set():
            tick_wall = start_wall + k / self.hz
            tick = k * self.dt
            self._receive(client, schedule, tick_wall)
            if k > 0:
                self._send(client, schedule, tick, self.pool[k % len(self.pool)])
            if schedule.remaining(tick) == 0:  # nothing to execute: wait for a chunk until the action deadline
                self._receive(client, schedule, tick_wall + ACTION_DEADLINE / self.hz, tick)
            if schedule.next(tick).hold:
                self.held_at.append(time.perf_counter())
            self.ticks += 1
            k += 1

    def _receive(self, client, schedule, until_wall: float, action_for: float | None = None) -> None:
        """Receive chunks until wall time `until_wall`, offering each to the schedule; with
        `action_for`, only until the schedule has an action for that robot time."""
        while action_for is None or schedule.remaining(action_for) == 0:
            left = until_wall - time.perf_counter()
            reply = client.poll(max(0.0, left))
            if reply is not None:
                sent = self._asked.pop(reply.seq, None)
                if sent is not None:
                    now = time.perf_counter()
                    self.latencies.append((now, (now - sent) * 1e3))
                    self._recent.append(now - sent)
                schedule.offer(reply)
            if left <= 0:
                return

    def _send(self, client, schedule, tick: float, obs: dict[str, np.ndarray]) -> None:
        """Ask for the next chunk when the current one (up to its replan point) runs out
        within the recent latency; otherwise the observation is history only."""
        lead = math.ceil(max(self._recent, default=0.0) * self.hz)
        if client.busy or schedule.remaining(tick, before_replan=True) > lead:
            client.send_history(obs, tick)
            return
        sent = time.perf_counter()
        seq = client.send_observation(obs, tick)
        if seq is not None:
            self._asked = {seq: sent}

    def result(self) -> RobotResult:
        return RobotResult(robot=self.robot_id, ticks=self.ticks, held_steps=len(self.held_at),
                           chunks=len(self.latencies), chunk_latency=summarize_ms(ms for _, ms in self.latencies),
                           reconnects=self.reconnects, errors=dict(self.errors))


# -- one server ----------------------------------------------------------------------------------------

def serve_argv(package_dir: Path, sampler: str, threads: int, bind: str, scheduling: str,
               serve_args: list[str]) -> list[str]:
    argv = dpstack_command("serve", str(package_dir), "--sampler", sampler, "--bind", bind, "--threads", str(threads),
                           "--stats-interval", "3600")
    if scheduling != "default":
        argv += ["--scheduling", scheduling]
    return argv + serve_args


def refusal(output: str) -> str | None:
    """One sentence when `dpstack serve` refused its command line (argparse's error line)."""
    for line in reversed(output.splitlines()):
        if ": error: " in line:
            why = line.split(": error: ", 1)[1]
            return (f"this dpstack serve does not accept the options it was given ({why}); drop them from "
                    f"--scheduling/--serve-args or use a dpstack whose `dpstack serve --help` lists them")
    return None


def start_server(argv: list[str], name: str) -> ChildProcess:
    server = ChildProcess(argv, name=name)
    try:
        server.wait_ready(START_TIMEOUT_S)
    except ChildFailed as e:
        raise FleetError(refusal(server.output) or str(e)) from None
    return server


def rss_mb(pid: int) -> float | None:
    """The process's resident memory (VmRSS) in MB, None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def batch_summary(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    batch = (stats or {}).get(BATCH_KEY)
    return batch if isinstance(batch, dict) and batch.get("n") else None


def run_fleet(package_dir: Path, model: str, sampler: str, robots: int, args: argparse.Namespace,
              scheduling: str, log=print) -> FleetRun:
    """One server, `robots` robots for `args.seconds`; returns what each robot and the server did."""
    from dpstack.core.spec import RobotSpec
    from dpstack.policy.bench_latency import observation_pool
    from dpstack.runtime.package import describe, read_manifest

    spec, normalizer, _, _ = describe(read_manifest(package_dir))
    obs_keys = tuple(read_manifest(package_dir)["obs_keys"])
    spec: RobotSpec = spec.with_observations(obs_keys)  # what `dpstack serve` asks robots to publish
    serve_args = shlex.split(args.serve_args)
    argv = serve_argv(package_dir, sampler, args.threads, "tcp://127.0.0.1:*", scheduling, serve_args)
    name = f"serve {model} {sampler} {scheduling}"
    server = start_server(argv, name)
    endpoint = server.ready["endpoint"]
    restarts = 0
    fleet = [SimulatedRobot(endpoint, spec, f"robot-{i}", observation_pool(spec, normalizer, obs_keys,
                                                                          np.random.default_rng(args.seed + i)),
                            args.hz, args.seed + i) for i in range(robots)]
    clock: dict[str, float] = {}
    barrier = threading.Barrier(robots, action=lambda: clock.update(start=time.perf_counter() + 0.1))
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(barrier, clock, stop, i == 0), name=r.robot_id, daemon=True)
               for i, r in enumerate(fleet)]
    rss: list[list[float | None]] = []
    try:
        for t in threads:
            t.start()
        while "start" not in clock and not barrier.broken:
            time.sleep(0.05)
        failed = sorted((r.failure for r in fleet if r.failure), key=lambda f: f == NOT_STARTED)
        if barrier.broken or failed:
            raise FleetError(next(iter(failed), NOT_STARTED))
        start = clock["start"]
        next_sample = start
        while time.perf_counter() < start + args.seconds:
            now = time.perf_counter()
            if now >= next_sample:
                rss.append([round(now - start, 1), rss_mb(server.proc.pid)])
                next_sample += args.sample_s
            if not server.alive():
                restarts += 1
                log(f"{name}: the server exited (code {server.proc.returncode}); starting it again on {endpoint}")
                server = start_server(serve_argv(package_dir, sampler, args.threads, endpoint, scheduling, serve_args), name)
            time.sleep(min(0.5, max(0.0, min(next_sample, start + args.seconds) - time.perf_counter())))
        rss.append([round(time.perf_counter() - start, 1), rss_mb(server.proc.pid)])
        stop.set()
        for t in threads:
            t.join(30.0)
    finally:
        stop.set()
        server.stop()
    stats = fleet[0].stats or {}
    run = FleetRun(model=model, sampler=sampler, scheduling=scheduling, robots=robots, hz=args.hz, seconds=args.seconds,
                   serve_args=serve_args, robot_results=[r.result() for r in fleet], batch=batch_summary(stats),
                   server_restarts=restarts, rss_mb=rss, server_stats=stats)
    if args.soak:
        run.intervals = intervals(fleet, start, args.seconds, args.sample_s, rss)
    return run


def intervals(fleet: list[SimulatedRobot], start: float, seconds: float, every: float,
              rss: list[list[float | None]]) -> list[dict[str, Any]]:
    """Per `every` seconds of the run: held steps and chunk latency of all robots, the server's memory."""
    rows = []
    n = max(1, math.ceil(seconds / every))
    for i in range(n):
        lo, hi = start + i * every, start + min((i + 1) * every, seconds)
        held = sum(lo <= t < hi for r in fleet for t in r.held_at)
        lat = summarize_ms(ms for r in fleet for t, ms in r.latencies if lo <= t < hi)
        mem = [m for s, m in rss if i * every <= s < (i + 1) * every]
        rows.append({"from_s": i * every, "held_steps": held, "chunks": lat["n"], "p99_ms": lat["p99_ms"],
                     "rss_mb": mem[0] if mem else None})
    return rows


# -- reporting -----------------------------------------------------------------------------------------

def format_batches(batch: dict[str, Any] | None) -> str:
    if not batch:
        return "-"
    return f"mean {batch['mean']:.2f}, p50 {batch['p50']:g}, max {batch['max']:g} ({batch['n']} calls)"


def markdown_table(runs: list[FleetRun], context: str) -> str:
    lines = [f"# dpstack bench fleet\n\n{context}\n",
             "| model | sampler | robots | scheduling | held steps | ticks | worst chunk p99 ms | median chunk p50 ms | "
             "server batch size | restarts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        p50s = [x.chunk_latency["p50_ms"] for x in r.robot_results if x.chunk_latency["n"]]
        lines.append(f"| {r.model} | {r.sampler} | {r.robots} | {r.scheduling} | {r.held_steps} | "
                     f"{sum(x.ticks for x in r.robot_results)} | {format_ms(r.worst_p99_ms)} | "
                     f"{format_ms(float(np.median(p50s)) if p50s else None)} | {format_batches(r.batch)} | "
                     f"{r.server_restarts} |")
    lines += ["", "| model | sampler | robots | scheduling | robot | ticks | held | chunks | p50 ms | p99 ms | reconnects |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for x in r.robot_results:
            lines.append(f"| {r.model} | {r.sampler} | {r.robots} | {r.scheduling} | {x.robot} | {x.ticks} | {x.held_steps} | "
                         f"{x.chunks} | {format_ms(x.chunk_latency['p50_ms'])} | {format_ms(x.chunk_latency['p99_ms'])} | "
                         f"{x.reconnects} |")
    for r in runs:
        if r.intervals:
            lines += ["", f"{r.model} {r.sampler} {r.robots} robots {r.scheduling}, per interval:", "",
                      "| from s | held steps | chunks | p99 ms | server RSS MB |", "|---|---|---|---|---|"]
            lines += [f"| {row['from_s']:g} | {row['held_steps']} | {row['chunks']} | {format_ms(row['p99_ms'])} | "
                      f"{format_ms(row['rss_mb'], '.1f')} |" for row in r.intervals]
    return "\n".join(lines) + "\n"


def write_report(out: Path, runs: list[FleetRun], context: str) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"context": context, "runs": [asdict(r) for r in runs]}, indent=2))
    table = markdown_table(runs, context)
    out.with_suffix(".md").write_text(table)
    return table


# -- command line --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpstack bench fleet",
                                description="N simulated robots at their control rate against one dpstack serve")
    p.add_argument("--out", default="out/bench/fleet.json", help="JSON file to write, a .md table next to it (default %(default)s)")
    p.add_argument("--models", default="small",
                   help="comma list of random-weight models as `dpstack bench latency` builds them (default %(default)s)")
    p.add_argument("--package", action="append", default=[], help="serve an exported package dir instead; repeatable")
    p.add_argument("--samplers", default="streaming", help="comma list, as `dpstack serve --sampler` takes them "
                                                            "(a bare number continues an rti list; default %(default)s)")
    p.add_argument("--robots", default="1,4", help="comma list of fleet sizes (default %(default)s)")
    p.add_argument("--hz", type=float, default=20.0, help="control rate of every robot (default %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run, after start-up (default %(default)s)")
    p.add_argument("--scheduling", default="",
                   help="comma list; each run passes `--scheduling X` to dpstack serve, modes side by side "
                        "(default: pass nothing)")
    p.add_argument("--serve-args", default="", help="more options for every dpstack serve, as one quoted string")
    p.add_argument("--threads", type=int, default=2, help="the server's onnxruntime intra-op threads (default %(default)s)")
    p.add_argument("--soak", action="store_true",
                   help="also report held steps, chunk p99 and server memory every --sample-s seconds")
    p.add_argument("--sample-s", type=float, default=60.0, help="server memory sampling interval (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and observations (default 0)")
    return p


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dpstack.runtime.samplers import split_sampler_names

    try:
        robots = [int(n) for n in _split(args.robots)]
    except ValueError:
        robots = []
    if not robots or min(robots) < 1:
        print(f"dpstack bench fleet: --robots {args.robots!r} is not a list of positive counts; e.g. --robots 1,4,16",
              file=sys.stderr)
        return 2
    if args.hz <= 0 or args.seconds <= 0 or args.sample_s <= 0:
        print("dpstack bench fleet: --hz, --seconds and --sample-s must be positive", file=sys.stderr)
        return 2
    from dpstack.policy.bench_latency import MODELS

    models = [] if args.package else _split(args.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"dpstack bench fleet: unknown model {unknown[0]!r}; have {sorted(MODELS)}", file=sys.stderr)
        return 2
    for p in args.package:
        if not (Path(p) / "manifest.json").is_file():
            print(f"dpstack bench fleet: {p} is not a policy package (no manifest.json); pass an exported package "
                  "dir or use --models", file=sys.stderr)
            return 2
    samplers = split_sampler_names(args.samplers)
    schedulings = _split(args.scheduling) or ["default"]
    out = Path(args.out)
    context = (f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {args.hz:g} Hz, {args.seconds:g} s per run, "
               f"server threads {args.threads}{', serve args ' + args.serve_args if args.serve_args else ''}; "
               f"chunk latency = observation sent -> chunk received, per robot; held step = a tick with no action "
               f"at {ACTION_DEADLINE:g} of its period; batch sizes over the server's life (start-ups included), "
               f"'-' where the server does not report them")
    runs: list[FleetRun] = []
    try:
        with tempfile.TemporaryDirectory(prefix="dpstack-fleet-") as tmp:
            packages = [(Path(p).name, Path(p)) for p in args.package]
            for m in models:
                from dpstack.policy.bench_latency import build_and_export

                print(f"building and exporting {m} (random weights) ...", file=sys.stderr, flush=True)
                build_and_export(m, Path(tmp) / m, args.seed)
                packages.append((m, Path(tmp) / m))
            for name, pdir in packages:
                for sampler in samplers:
                    for n in robots:
                        for scheduling in schedulings:  # innermost: the modes side by side
                            print(f"{name} {sampler} {n} robots, scheduling {scheduling} ...", file=sys.stderr, flush=True)
                            runs.append(run_fleet(pdir, name, sampler, n, args, scheduling,
                                                  log=lambda s: print(s, file=sys.stderr, flush=True)))
                            write_report(out.with_suffix(".partial.json"), runs, "partial run; " + context)
    except FleetError as e:
        if runs:
            write_report(out, runs, context)
        print(f"dpstack bench fleet: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if runs:
            write_report(out, runs, "interrupted; " + context)
            print(f"interrupted; wrote the {len(runs)} finished runs to {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    table = write_report(out, runs, context)
    for suffix in (".partial.json", ".partial.md"):
        out.with_suffix(suffix).unlink(missing_ok=True)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
