"""Test helper: a policy server in a real subprocess, on loopback."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from dpstack.core.process import ChildProcess

REPO = Path(__file__).resolve().parents[1]
ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"


class ServerProcess:
    """Runs tests/echo_server.py (the TEST EchoPolicy server) or any command that
    prints the ready line with its endpoint once bound."""

    def __init__(self, bind: str = "tcp://127.0.0.1:*", args: tuple[str, ...] = (),
                 command: list[str] | None = None, ready_timeout_s: float = 20.0) -> None:
        self.command = command or [sys.executable, str(ECHO_SERVER), "--bind", bind, *args]
        self.ready_timeout_s = ready_timeout_s
        self.child: ChildProcess | None = None
        self.endpoint: str | None = None

    def start(self) -> "ServerProcess":
        self.child = ChildProcess(self.command, "server", cwd=REPO)
        self.endpoint = self.child.wait_ready(self.ready_timeout_s)["endpoint"]
        return self

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def stop(self, timeout_s: float = 10.0) -> tuple[int, str]:
        """SIGTERM, wait; returns (returncode, all output: stdout and stderr)."""
        assert self.child is not None
        self.child.proc.send_signal(signal.SIGTERM)
        return self.child.stop(timeout_s), self.child.output

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
