"""Process scheduling for control loops: own cores, real-time priority, locked memory.

A control loop that shares its core, waits behind ordinary processes or takes a
page fault misses deadlines on a busy computer. Deployed arms use the same three
knobs (ros2_control and libfranka: SCHED_FIFO, mlockall, dedicated cores).

Call `apply_realtime` first thing in a process, before it starts threads
(ZeroMQ's I/O thread, onnxruntime's pool): Linux sets affinity and policy per
thread, and new threads inherit them.

`StallProbe` measures what the loop could not control: time the hypervisor took
from the VM (steal) and time this thread waited for a core (run queue), so a
missed deadline can be told apart from a slow policy.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
from dataclasses import dataclass

MCL_CURRENT, MCL_FUTURE = 1, 2  # Linux x86-64 and arm64 values


class RealtimeError(RuntimeError):
    """A requested scheduling setting could not be applied (with what to change)."""


@dataclass(frozen=True)
class RealtimeConfig:
    cpus: tuple[int, ...] = ()   # run only on these cores; () = wherever the OS likes
    priority: int = 0            # SCHED_FIFO priority 1..99; 0 = ordinary scheduling
    lock_memory: bool = False    # mlockall: no page faults on a timed tick

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 99:
            raise ValueError(f"real-time priority must be in 1..99 (0: off), got {self.priority}")
        if any(c < 0 for c in self.cpus):
            raise ValueError(f"CPU numbers must be >= 0, got {list(self.cpus)}")

    @property
    def active(self) -> bool:
        return bool(self.cpus or self.priority or self.lock_memory)

    def argv(self) -> list[str]:
        """The command-line options that request this config (for child processes)."""
        out = []
        if self.cpus:
            out += ["--cpus", format_cpus(self.cpus)]
        if self.priority:
            out += ["--rt-priority", str(self.priority)]
        if self.lock_memory:
            out += ["--lock-memory"]
        return out


def parse_cpus(text: str) -> tuple[int, ...]:
    """'0', '2,3', '0-3,6' -> sorted core numbers."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: expected numbers and ranges like 0-3,6") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {text!r}")
    return tuple(sorted(cpus))


def available_cpus() -> tuple[int, ...]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def format_cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


def apply_realtime(config: RealtimeConfig) -> None:
    """Apply `config` to the calling thread (and the threads it starts later)."""
    if not config.active:
        return
    if not sys.platform.startswith("linux"):
        raise RealtimeError("--cpus, --rt-priority and --lock-memory are implemented for Linux only")
    if config.cpus:
        allowed = available_cpus()
        outside = [c for c in config.cpus if c not in allowed]
        if outside:
            raise RealtimeError(f"CPUs {outside} are not available to this process (allowed: {format_cpus(allowed)})")
        os.sched_setaffinity(0, config.cpus)
    if config.lock_memory:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            err = ctypes.get_errno()
            raise RealtimeError(f"mlockall failed ({os.strerror(err)}): raise the locked-memory limit "
                                "(ulimit -l unlimited, or LimitMEMLOCK=infinity in the systemd unit)")
    if config.priority:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(config.priority))
        except PermissionError:
            raise RealtimeError(f"no permission for SCHED_FIFO priority {config.priority}: run with CAP_SYS_NICE, "
                                "or allow it (LimitRTPRIO=95 in the systemd unit, or rtprio in "
                                "/etc/security/limits.conf)") from None


def current_scheduling() -> dict:
    """How the calling thread is scheduled now, for result files and logs."""
    if not sys.platform.startswith("linux"):
        return {}
    policy = os.sched_getscheduler(0)
    return {"cpus": format_cpus(available_cpus()),
            "policy": {os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr"}.get(policy, "other"),
            "priority": os.sched_getparam(0).sched_priority}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("real-time scheduling (Linux)")
    g.add_argument("--cpus", default="", metavar="LIST",
                   help="run only on these cores, e.g. 1 or 2-3 (default: any)")
    g.add_argument("--rt-priority", type=int, default=0, metavar="N",
                   help="SCHED_FIFO priority 1..99 (needs CAP_SYS_NICE or an rtprio limit; default: off)")
    g.add_argument("--lock-memory", action="store_true", help="mlockall, so no timed step waits on a page fault")


def from_args(args: argparse.Namespace) -> RealtimeConfig:
    """The RealtimeConfig the options ask for (ValueError on a bad value)."""
    return RealtimeConfig(cpus=parse_cpus(args.cpus) if args.cpus else (), priority=args.rt_priority,
                          lock_memory=args.lock_memory)


def apply_from_args(args: argparse.Namespace, program: str) -> bool:
    """Apply the options; on failure print why for `program` and return False."""
    try:
        apply_realtime(from_args(args))
    except (ValueError, RealtimeError) as e:
        print(f"{program}: {e}", file=sys.stderr)
        return False
    return True


class StallProbe:
    """Stolen time (whole VM) and this thread's run-queue wait, in ms since the last `read`.

    Reads /proc with pread on open files (tens of microseconds). Steal counts in
    clock ticks (10 ms), so it shows stalls, not jitter. Reads 0 where /proc lacks them.
    """

    def __init__(self) -> None:
        self._tick_ms = 1e3 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 10.0
        self._stat = self._open("/proc/stat")
        self._sched = self._open(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        self._last = self._counters()

    @staticmethod
    def _open(path: str) -> int | None:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None

    def _counters(self) -> tuple[float, float]:
        steal = wait = 0.0
        if self._stat is not None:
            fields = os.pread(self._stat, 512, 0).split(b"\n", 1)[0].split()
            if len(fields) > 8 and fields[0] == b"cpu":
                steal = int(fields[8]) * self._tick_ms
        if self._sched is not None:
            fields = os.pread(self._sched, 128, 0).split()
            if len(fields) >= 2:
                wait = int(fields[1]) / 1e6
        return steal, wait

    def read(self) -> tuple[float, float]:
        """(steal_ms, runqueue_wait_ms) since the previous read (or construction)."""
        now = self._counters()
        steal, wait = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return steal, wait

    def close(self) -> None:
        for fd in (self._stat, self._sched):
            if fd is not None:
                os.close(fd)
        self._stat = self._sched = None
