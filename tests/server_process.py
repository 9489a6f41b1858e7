"""Test helper: a policy server in a real subprocess, on loopback."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    """Runs `python -m runtime.testing` (the TEST EchoPolicy server) or any command
    that prints "serving ... on ENDPOINT" once bound."""

    def __init__(self, bind: str = "tcp://127.0.0.1:*", args: tuple[str, ...] = (),
                 command: list[str] | None = None, ready_timeout_s: float = 20.0) -> None:
        self.command = command or [sys.executable, "-m", "runtime.testing", "--bind", bind, *args]
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.endpoint: str | None = None

    def start(self) -> "ServerProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO, env=env)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("serving "):
                    self.endpoint = line.rsplit(" on ", 1)[1].strip()
                    return self
                if not line and self.proc.poll() is not None:
                    break
        err = self.proc.stderr.read() if self.proc.poll() is not None else ""
        self.kill()
        raise RuntimeError(f"server did not start: {self.command}\n{err}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> tuple[int, str, str]:
        """SIGTERM, wait; returns (returncode, rest of stdout, stderr)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None:
            for f in (self.proc.stdout, self.proc.stderr):
                if f:
                    f.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
