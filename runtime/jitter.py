"""How late does this computer wake a sleeping thread? (cyclictest, in Python)

A control loop can only be as punctual as the platform under it. `wake_loop`
sleeps to an absolute grid at `hz` and records how late each wake-up came. It
runs as a benchmark (`dpstack bench jitter`) before trusting a computer with an
arm, or as a witness on every core during a realtime evaluation
(`dpstack eval --witness`): its stalls carry CLOCK_MONOTONIC times, shared by
every process, so each deadline miss can be checked against them.

    dpstack bench jitter --cpus 0,1 --seconds 30 --rt-priority 60 --out out/bench/jitter.json
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dpstack.core.files import write_atomic
from dpstack.core.process import announce_ready
from dpstack.core.stats import Summary, format_ms, summarize_ms
from dpstack.runtime import realtime


@dataclass
class JitterResult:
    cpu: str
    hz: float
    seconds: float
    wakeups: int
    late: Summary                        # how late the wake-ups came (ms)
    stall_ms: float                      # a wake-up later than this is a stall
    # (monotonic time the thread should have woken, ms late): the core was not the
    # thread's from then until then + ms late
    stalls: list[tuple[float, float]] = field(default_factory=list)
    work_p50_us: float = 0.0             # the fixed bit of work done at each wake-up
    # (start, ms, times slower): runs of wake-ups whose work took SLOW_FACTOR x its
    # median or longer: the core was there but slow (a host busy on its other half)
    slowdowns: list[tuple[float, float, float]] = field(default_factory=list)
    scheduling: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


WORK_LOOPS = 200          # a few microseconds of interpreter work per wake-up
SLOW_FACTOR = 5.0         # work this many times its median is slow...
SLOW_RUN = 5              # ...for this many wake-ups in a row: a slowdown


@dataclass
class WakeLog:
    wakeups: array                       # monotonic wake times (s)
    late_ms: array                       # how late each came (ms)
    work_us: array = field(default_factory=lambda: array("d"))  # time the fixed work took (us)


def wake_loop(hz: float, seconds: float | None, stop: Callable[[], bool] = lambda: False) -> WakeLog:
    """Sleep to an absolute `hz` grid for `seconds` (None: until `stop()`); a late
    wake-up is not made up for: the grid stays put and skipped slots are skipped."""
    if hz <= 0:
        raise ValueError(f"hz must be positive, got {hz}")
    period = 1.0 / hz
    log = WakeLog(array("d"), array("d"))
    start = time.monotonic()
    k = 1
    while not stop() and (seconds is None or k * period <= seconds):
        target = start + k * period
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.monotonic()
        t0 = time.perf_counter_ns()
        for _ in range(WORK_LOOPS):
            pass
        log.work_us.append((time.perf_counter_ns() - t0) / 1e3)
        log.wakeups.append(now)
        log.late_ms.append(max(0.0, now - target) * 1e3)
        k = max(k + 1, int((now - start) / period) + 1)
    return log


def summarize(log: WakeLog, hz: float, stall_ms: float) -> JitterResult:
    n = len(log.late_ms)
    stalls = [(round(t - ms / 1e3, 6), round(ms, 3)) for t, ms in zip(log.wakeups, log.late_ms) if ms >= stall_ms]
    span = (log.wakeups[-1] - log.wakeups[0]) if n > 1 else 0.0
    work = sorted(log.work_us)
    work_p50 = work[len(work) // 2] if work else 0.0
    scheduling = realtime.current_scheduling()
    return JitterResult(cpu=scheduling.get("cpus", ""), hz=hz, seconds=span, wakeups=n,
                        late=summarize_ms(log.late_ms),
                        stall_ms=stall_ms, stalls=stalls, work_p50_us=work_p50,
                        slowdowns=slowdowns(log, work_p50, 1.0 / hz), scheduling=scheduling)


def slowdowns(log: WakeLog, work_p50_us: float, period: float) -> list[tuple[float, float, float]]:
    """Runs of at least SLOW_RUN wake-ups whose work took SLOW_FACTOR x the median or more."""
    out: list[tuple[float, float, float]] = []
    run: list[int] = []
    for i, w in enumerate([*log.work_us, 0.0]):  # a sentinel closes the last run
        if work_p50_us > 0 and w >= SLOW_FACTOR * work_p50_us:
            run.append(i)
            continue
        if len(run) >= SLOW_RUN:
            start, end = log.wakeups[run[0]], log.wakeups[run[-1]] + period
            factor = sorted(log.work_us[j] for j in run)[len(run) // 2] / work_p50_us
            out.append((round(start, 6), round((end - start) * 1e3, 3), round(factor, 2)))
        run = []
    return out


def stalled_during(stalls, t0: float, t1: float) -> bool:
    """Whether any stall or slowdown (start, ms, ...) overlaps the monotonic interval [t0, t1]."""
    return any(s[0] <= t1 and s[0] + s[1] / 1e3 >= t0 for s in stalls)


def _one_cpu(args: argparse.Namespace) -> int:
    """Measure on the current core(s) until done or SIGTERM; JSON to --out or stdout."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    if not realtime.apply_from_args(args, "dpstack bench jitter"):
        return 2
    announce_ready()
    log = wake_loop(args.hz, args.seconds or None, stop=lambda: bool(stopping))
    result = summarize(log, args.hz, args.stall_ms).to_dict()
    text = json.dumps(result)
    if args.out:
        write_atomic(args.out, text)
    else:
        print(text, flush=True)
    return 0


def one_cpu_command(cpu: int, hz: float, stall_ms: float, seconds: float = 0.0, priority: int = 0,
                    lock_memory: bool = False, out: Path | None = None) -> list[str]:
    """argv of one measuring process on `cpu` (seconds 0: until SIGTERM); JSON to `out` or stdout."""
    sched = realtime.RealtimeConfig(cpus=(cpu,), priority=priority, lock_memory=lock_memory)
    return [sys.executable, "-m", "dpstack.runtime.jitter", "--one", "--hz", str(hz), "--seconds", str(seconds),
            "--stall-ms", str(stall_ms), *sched.argv(), *(["--out", str(out)] if out else [])]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpstack bench jitter", description=__doc__.split("\n\n")[0])
    p.add_argument("--hz", type=float, default=1000.0, help="wake-ups per second (default 1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to measure (0: until SIGTERM or Ctrl-C)")
    p.add_argument("--stall-ms", type=float, default=2.0, help="list wake-ups at least this late (default 2 ms)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single measuring process
    realtime.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        return _one_cpu(args)
    try:
        cpus = realtime.parse_cpus(args.cpus) if args.cpus else realtime.available_cpus()
    except ValueError as e:
        print(f"dpstack bench jitter: {e}", file=sys.stderr)
        return 2
    # One process per core, so no thread waits for another's interpreter lock.
    procs = [subprocess.Popen(one_cpu_command(c, args.hz, args.stall_ms, args.seconds, args.rt_priority, args.lock_memory),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cpus]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the children; their results still come
    results, failed = [], False
    for c, proc in zip(cpus, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            print(f"dpstack bench jitter: core {c}: {err.strip()}", file=sys.stderr)
            failed = True
            continue
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'cpu':>4} {'policy':>8} {'wake-ups':>9} {'late p50':>9} {'p99':>8} {'max (ms)':>9} {'stalls':>7} {'slowdowns':>10}")
    for r in results:
        s = r["scheduling"]
        late = {k: format_ms(v, ".3f") for k, v in r["late"].items() if k != "n"}
        print(f"{r['cpu']:>4} {s.get('policy', '?') + str(s.get('priority') or ''):>8} {r['wakeups']:>9} "
              f"{late['p50_ms']:>9} {late['p99_ms']:>8} {late['max_ms']:>9} {len(r['stalls']):>7} "
              f"{len(r['slowdowns']):>10}")
    if args.out:
        write_atomic(args.out, json.dumps({"hz": args.hz, "seconds": args.seconds, "cpus": results}, indent=1))
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
