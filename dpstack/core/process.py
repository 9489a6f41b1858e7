"""Child processes that announce when they are ready.

Every long-running dpstack process (policy server, simulated arm process, jitter
probe, benchmark servers) prints one machine-readable line once it is ready:

    {"ready": true, "endpoint": "tcp://127.0.0.1:5555", ...}

`announce_ready` writes it; `ChildProcess` starts a child, keeps the tail of its
output (optionally echoing or logging every line) and waits for that line.
Nobody parses a human sentence to find an endpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence


# Exit status of a command stopped by Ctrl-C (SIGINT): the shell's 128 + signal number.
# The rule for every dpstack command is in dpstack/cli.py's docstring.
EXIT_INTERRUPTED = 128 + signal.SIGINT


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child SIGTERM when this process dies,
    even by SIGKILL, so a killed `dpstack demo` or `eval` leaves no server or training run
    behind on the cores (the child's SIGTERM stop keeps what finished). Linux only; None
    elsewhere. The kernel sends it when the *thread* that started the child ends, so a
    child started from any thread but the main one (which lives as long as the process)
    gets no such request (None)."""
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took hold
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def dpstack_command(*args: str) -> list[str]:
    """Run a dpstack subcommand with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "dpstack.cli", *args]


def announce_ready(**fields: Any) -> None:
    """Print the ready line on stdout (flushed: the parent is waiting for it)."""
    print(json.dumps({"ready": True, **fields}, sort_keys=True), flush=True)


def parse_ready(line: str) -> dict[str, Any] | None:
    """The fields of a ready line, or None when `line` is anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        d = json.loads(line)
    except ValueError:
        return None
    return d if isinstance(d, dict) and d.get("ready") is True else None


class ChildFailed(RuntimeError):
    """A child exited or timed out before it was ready; the message holds its last output."""


class ChildProcess:
    """A child process whose stdout and stderr are read on a thread.

    `lines` keeps the last `keep` lines; `echo` sees every line as it comes and
    `log_path` gets all of them. `wait_ready` returns the ready line's fields.
    `new_session` puts the child in its own process group, so a terminal's Ctrl-C
    reaches only the parent, which then stops the child in order.
    """

    def __init__(self, argv: Sequence[str], name: str = "", env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, echo: Callable[[str], None] | None = None,
                 log_path: Path | None = None, keep: int = 200, new_session: bool = False) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.keep = keep
        self.lines: list[str] = []
        self.ready: dict[str, Any] | None = None
        self._ready_event = threading.Event()
        self._echo = echo
        self._log = open(log_path, "w") if log_path else None
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env=env, cwd=cwd, start_new_session=new_session,
                                     preexec_fn=die_with_parent_preexec())
        self._reader = threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True)
        self._reader.start()

    @classmethod
    def python(cls, module: str, *args: str, **kwargs: Any) -> "ChildProcess":
        """`python -m module args...` with this interpreter."""
        return cls([sys.executable, "-m", module, *args], name=kwargs.pop("name", module.rsplit(".", 1)[-1]), **kwargs)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if len(self.lines) > self.keep:
                del self.lines[: len(self.lines) - self.keep]
            if self._log:
                self._log.write(line + "\n")
                self._log.flush()
            if self.ready is None:
                ready = parse_ready(line)
                if ready is not None:
                    self.ready = ready
                    self._ready_event.set()
            if self._echo:
                self._echo(line)
        if self._log:
            self._log.close()
        self._ready_event.set()  # EOF: whoever waits learns it will never be ready

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        self._ready_event.wait(timeout_s)
        if self.ready is None:
            code = self.proc.poll()
            why = f"exited with code {code}" if code is not None else f"was not ready within {timeout_s:g} s"
            self.kill()
            tail = "\n".join(self.lines[-20:])
            raise ChildFailed(f"{self.name} {why}" + (f"; its last output:\n{tail}" if tail else ""))
        return self.ready

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)

    def __enter__(self) -> "ChildProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
