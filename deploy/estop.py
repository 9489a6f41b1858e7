"""The e-stop latch and the three ways to pull it: a signal, a key, a ZeroMQ command.

Once latched it stays latched until an explicit `reset()` (the bridge calls
it from the 'r' key or a `reset` message on the e-stop socket). This is a
software stop on top of, never instead of, the arm's hardware e-stop.

Send from a shell:  python -m dpstack.deploy.estop tcp://127.0.0.1:5599 estop|reset|status
"""
from __future__ import annotations

import argparse
import logging
import select
import signal
import sys
import threading
import time

log = logging.getLogger("dpstack.deploy.estop")


class EStop:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason = ""
        self.count = 0          # how many times it was pulled
        self.reset_requested = threading.Event()

    @property
    def latched(self) -> bool:
        return self._event.is_set()

    def trigger(self, reason: str) -> None:
        # Signal handlers may run this between any two bytecodes: keep it tiny and lock-free
        # where it matters (Event.set is safe); the counter is informational.
        if not self._event.is_set():
            self.reason = reason
            self.count += 1
        self._event.set()

    def request_reset(self) -> None:
        """Ask the owner (the bridge loop) to reset from the measured state."""
        self.reset_requested.set()

    def reset(self) -> None:
        with self._lock:
            self._event.clear()
            self.reset_requested.clear()
            self.reason = ""


def install_signal(estop: EStop, name: str = "SIGUSR1") -> None:
    """`kill -USR1 <pid>` pulls the e-stop. Must be called from the main thread."""
    sig = getattr(signal, name, None)
    if sig is None:
        raise ValueError(f"unknown signal {name!r}")
    signal.signal(sig, lambda signum, frame: estop.trigger(f"signal {name}"))


class KeyWatcher(threading.Thread):
    """On an interactive terminal: 'e' or space pulls the e-stop, 'r' asks for a reset.

    The terminal stays in line mode: press the key then Enter.
    """

    def __init__(self, estop: EStop, stream=None):
        super().__init__(daemon=True, name="estop-keys")
        self.estop = estop
        self.stream = stream or sys.stdin
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            ready, _, _ = select.select([self.stream], [], [], 0.1)
            if not ready:
                continue
            line = self.stream.readline()
            if not line:
                return
            key = line[:1]
            if key in ("e", "E", " "):
                self.estop.trigger("key")
            elif key == "r":
                self.estop.request_reset()

    def stop(self) -> None:
        self._halt.set()


class EStopServer(threading.Thread):
    """A REP socket taking b"estop", b"reset" or b"status"; answers b"latched: <reason>" or b"ok".

    Binds where the config says (loopback by default); anyone who can reach it can stop the
    arm, which is the point, so keep it on loopback or a trusted segment.
    """

    def __init__(self, estop: EStop, endpoint: str):
        super().__init__(daemon=True, name="estop-zmq")
        import zmq

        from dpstack.runtime.endpoint import EndpointError, bind

        self.estop = estop
        self.endpoint = endpoint
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self.bound = bind(self._sock, endpoint)  # EndpointError: no scheme, port in use
        except EndpointError:
            self._sock.close(0)
            raise
        self._halt = threading.Event()

    def run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                if not poller.poll(100):
                    continue
                msg = self._sock.recv()
                if msg == b"estop":
                    self.estop.trigger("zmq")
                elif msg == b"reset":
                    self.estop.request_reset()
                elif msg != b"status":
                    self._sock.send(b"error: expected estop, reset or status")
                    continue
                self._sock.send(b"latched: " + self.estop.reason.encode() if self.estop.latched else b"ok")
        finally:
            self._sock.close(0)

    def stop(self) -> None:
        self._halt.set()


def send(endpoint: str, command: str, timeout_s: float = 2.0) -> str:
    """Send one e-stop command; returns the reply. Raises TimeoutError if nobody answers."""
    import zmq

    from dpstack.runtime.endpoint import check_endpoint

    check_endpoint(endpoint)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(command.encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer from the e-stop socket at {endpoint}")
        return sock.recv().decode()
    finally:
        sock.close(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpstack.deploy.estop", description="send an e-stop command to a running bridge")
    p.add_argument("endpoint", help="the bridge's safety.estop_endpoint, e.g. tcp://127.0.0.1:5599")
    p.add_argument("command", choices=["estop", "reset", "status"], help="stop the arm, clear a stop, or ask its state")
    args = p.parse_args(argv)
    from dpstack.runtime.endpoint import EndpointError

    t0 = time.monotonic()
    try:
        reply = send(args.endpoint, args.command)
    except TimeoutError:
        # Loud on purpose: an operator must not believe the arm was stopped.
        print(f"{p.prog}: {args.command} NOT delivered: no bridge answered at {args.endpoint}; check that the "
              "bridge runs with this safety.estop_endpoint, and use the arm's hardware e-stop meanwhile",
              file=sys.stderr)
        return 1
    except EndpointError as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 2
    print(reply, f"({(time.monotonic() - t0) * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
