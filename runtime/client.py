"""Robot-side client of the policy server: a non-blocking DEALER with timeouts.

`PolicyClient` never blocks the robot's control loop (unless asked to wait):
`send_observation` sends at most one observation in flight, `poll` receives
replies and drives the connection. When an answer is overdue the socket is
closed and recreated and the handshake repeated, so the REQ-style lockup
(a lost reply wedging the socket forever) cannot happen. Executing the chunks
is `runtime.action_schedule.ActionSchedule`'s job.
"""
from __future__ import annotations

import collections
import enum
import logging
import time
from typing import Callable, Mapping

import numpy as np
import zmq

from dpstack.runtime.protocol import (DEFAULT_LIMITS, ActionReply, Bye, Error, ErrorCode, Heartbeat, HeartbeatAck,
                              Hello, HelloAck, Limits, Message, Observation, PolicyInfo, ProtocolError, Reset,
                              ResetAck, Stats, StatsRequest, check_arrays, check_actions, check_seed, decode, encode)
from dpstack.core.spec import RobotSpec

log = logging.getLogger(__name__)

SERVER_MESSAGES = (HelloAck, ActionReply, ResetAck, HeartbeatAck, Error, Stats, Bye)


class ClientState(str, enum.Enum):
    DISCONNECTED = "disconnected"   # no socket; (re)connect at the next poll after the back-off
    HANDSHAKING = "handshaking"     # Hello sent (or being retried), waiting for HelloAck
    READY = "ready"                 # session open: observations may be sent


class PolicyClient:
    """One robot's link to a policy server.

    timeout_s: an observation, heartbeat or Hello unanswered this long means the
    link is dead: the socket is recreated and the handshake repeated.
    A session's first chunk, and the first after a reset, is the policy's start-up
    (streaming and RTI: a full denoise, about a second on a CPU): it gets
    `startup_allowance()` instead, so a start-up slower than the per-step timeout
    is waited for rather than abandoned and restarted by every reconnect.
    heartbeat_s: with nothing in flight for this long a Heartbeat is sent, so a
    dead server is noticed (and the server's session kept alive) between episodes.
    """

    def __init__(self, endpoint: str, spec: RobotSpec, robot_id: str, *, seed: int | None = None,
                 timeout_s: float = 1.0, heartbeat_s: float = 1.0, retry_s: float = 0.2,
                 limits: Limits = DEFAULT_LIMITS, context: zmq.Context | None = None,
                 security: Callable[[zmq.Socket], None] | None = None) -> None:
        self.endpoint = endpoint
        self.spec = spec
        self.robot_id = robot_id
        self.seed = check_seed(seed)
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.retry_s = retry_s
        self.limits = limits
        self._context = context or zmq.Context.instance()
        # Configures authentication (runtime.auth.curve_client) on every new socket, before connect.
        self.security = security
        self._socket: zmq.Socket | None = None
        self.state = ClientState.DISCONNECTED
        self.session_id: str | None = None
        self.policy: PolicyInfo | None = None
        self._seq = 0
        # ("hello"|"obs", seq, perf_counter sent, seconds allowed)
        self._in_flight: tuple[str, int, float, float] | None = None
        self._heartbeat_sent: float | None = None
        self._last_activity = 0.0
        self._next_attempt = 0.0
        self._hello_deadline = 0.0
        self._pending_reset: int | None | bool = False
        self.episode: int | None = None
        self.latencies_s: collections.deque[float] = collections.deque(maxlen=100_000)
        self.errors: collections.deque[Error] = collections.deque(maxlen=1000)
        self.fatal: Error | None = None   # spec mismatch: retrying cannot help
        self.n_reconnects = 0
        self.last_stats: Mapping | None = None
        self._startup_pending = False   # the next chunk asked for is a start-up (new session or episode)
        self._startup_misses = 0        # start-ups in a row that ran out of their allowance

    # ------------------------------------------------------------------ public
    @property
    def ready(self) -> bool:
        return self.state is ClientState.READY

    def startup_allowance(self) -> float:
        """Seconds allowed for a start-up chunk: the timeout plus twice the start-up the
        server measured at load (HelloAck policy.startup_s; margin for a busier machine),
        doubled after each start-up in a row that still ran out (at most 16x), so a server
        that does not say, or a machine slower than measured, cannot trap the client in
        a loop of start-ups that are each abandoned. The robot holds meanwhile."""
        told = self.policy.startup_s if self.policy is not None else None
        base = self.timeout_s + 2.0 * max(0.0, told or 0.0)
        return base * 2 ** min(self._startup_misses, 4)

    def refusal(self) -> str | None:
        """One sentence for a fatal refusal (spec mismatch: retrying cannot help), or None."""
        if self.fatal is None:
            return None
        return f"the policy server at {self.endpoint} refused this robot's spec ({self.fatal.code}): {self.fatal.message}"

    @property
    def busy(self) -> bool:
        """An observation is awaiting its chunk."""
        return self._in_flight is not None and self._in_flight[0] == "obs"

    def send_observation(self, arrays: Mapping[str, np.ndarray], timestamp: float,
                         history_when_busy: bool = True) -> int | None:
        """Send this control step's observation (robot clock `timestamp`, seconds).

        Returns its seq when it asks for a chunk (session ready, none in flight).
        While a chunk is in flight it goes history-only (infer=False, no reply) so
        a policy with To > 1 keeps its history at control rate, and None is
        returned; also None when not connected. Raises ProtocolError if `arrays`
        do not match this robot's spec."""
        arrays = self._checked(arrays)
        self.poll(0.0)
        if self.state is not ClientState.READY:
            return None
        if self._in_flight is not None:
            if history_when_busy:
                self._send_history(arrays, timestamp)
            return None
        self._seq += 1
        sent = time.perf_counter()  # before sending: the thread may lose its core right after
        allowed = self.startup_allowance() if self._startup_pending else self.timeout_s
        if self._send(Observation(self._seq, float(timestamp), arrays)):
            self._in_flight = ("obs", self._seq, sent, allowed)
            return self._seq
        return None

    def send_history(self, arrays: Mapping[str, np.ndarray], timestamp: float) -> bool:
        """Send a history-only observation (infer=False: recorded, not answered)."""
        arrays = self._checked(arrays)
        return self.state is ClientState.READY and self._send_history(arrays, timestamp)

    def _send_history(self, arrays: Mapping[str, np.ndarray], timestamp: float) -> bool:
        self._seq += 1
        return self._send(Observation(self._seq, float(timestamp), arrays, infer=False))

    def _checked(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        check_arrays(arrays, self.spec.observations)
        for k, a in arrays.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ProtocolError(ErrorCode.NOT_FINITE, f"array {k!r} contains NaN or Inf")
        return arrays

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode on the server (sent now or right after the handshake)."""
        self._pending_reset = check_seed(seed)
        self._flush_reset()

    def poll(self, timeout_s: float = 0.0) -> ActionReply | None:
        """Drive the link; return the newest chunk received in this call, if any.
        Waits at most `timeout_s` for the first message."""
        self._drive()
        newest: ActionReply | None = None
        wait_ms = max(0, int(round(timeout_s * 1000)))
        while self._socket is not None:
            # wait only for the first message, then drain what is already there
            if not self._socket.poll(wait_ms, zmq.POLLIN):
                break
            wait_ms = 0
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            reply = self._handle(frames)
            if reply is not None:
                newest = reply
        self._drive()
        return newest

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the session is open (or `timeout_s` passes, or a fatal error)."""
        deadline = time.perf_counter() + timeout_s
        while not self.ready and self.fatal is None and time.perf_counter() < deadline:
            self.poll(min(0.05, max(0.0, deadline - time.perf_counter())))
        return self.ready

    def request(self, arrays: Mapping[str, np.ndarray], timestamp: float, timeout_s: float) -> ActionReply | None:
        """Blocking convenience: send one observation and wait for its chunk."""
        deadline = time.perf_counter() + timeout_s
        if not self.wait_ready(timeout_s):
            return None
        while self.busy and time.perf_counter() < deadline:  # let an earlier one finish
            self.poll(0.01)
        seq = self.send_observation(arrays, timestamp)
        if seq is None:
            return None
        while time.perf_counter() < deadline:
            reply = self.poll(max(0.0, deadline - time.perf_counter()))
            if reply is not None and reply.seq == seq:
                return reply
            if not self.busy:  # answered by an Error, or the link was reset
                return None
        return None

    def request_stats(self, timeout_s: float = 1.0) -> Mapping | None:
        """Ask the server for its metrics (blocking up to `timeout_s`)."""
        if not self.wait_ready(timeout_s) or self._socket is None:
            return None
        self.last_stats = None
        self._send(StatsRequest())
        deadline = time.perf_counter() + timeout_s
        while self.last_stats is None and time.perf_counter() < deadline:
            self.poll(0.02)
        return self.last_stats

    def close(self) -> None:
        """Say Bye (best effort) and close the socket."""
        if self._socket is not None and self.state is ClientState.READY:
            self._send(Bye("client closing"))
        self._close_socket()
        self.state = ClientState.DISCONNECTED

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _open_socket(self) -> None:
        s = self._context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        # Not ZMQ_IMMEDIATE: it discards replies already received when the peer
        # disconnects (a server's parting Bye). Whatever queues towards a dead
        # server is dropped with the socket when its answer times out.
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        if self.security is not None:
            self.security(s)
        s.connect(self.endpoint)
        self._socket = s

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._in_flight = None
        self._heartbeat_sent = None

    def _send(self, msg: Message) -> bool:
        if self._socket is None:
            return False
        try:
            self._socket.send_multipart(encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:  # send queue full
            return False
        self._last_activity = time.perf_counter()
        return True

    def _reconnect(self, why: str) -> None:
        log.warning("policy link %s: %s; reconnecting", self.endpoint, why)
        self._close_socket()
        self.state = ClientState.DISCONNECTED
        self.session_id = None
        self.n_reconnects += 1
        self._next_attempt = time.perf_counter() + self.retry_s

    def _start_handshake(self) -> None:
        self.state = ClientState.HANDSHAKING
        self._hello_deadline = time.perf_counter() + self.timeout_s
        self._in_flight = None
        self._heartbeat_sent = None
        self._send_hello()

    def _send_hello(self) -> None:
        if self._send(Hello(self.robot_id, self.spec, self.seed)):
            self._in_flight = ("hello", 0, time.perf_counter(), self.timeout_s)

    def _flush_reset(self) -> None:
        if self._pending_reset is not False and self.state is ClientState.READY:
            if self._send(Reset(self._pending_reset)):
                self._pending_reset = False
                self._startup_pending = True   # the new episode's first chunk starts the sampler up

    def _drive(self) -> None:
        """Time-based transitions: connect, retry Hello, time out, heartbeat."""
        if self.fatal is not None:
            return
        now = time.perf_counter()
        if self.state is ClientState.DISCONNECTED:
            if now >= self._next_attempt:
                self._open_socket()
                self._start_handshake()
            return
        if self.state is ClientState.HANDSHAKING:
            if now > self._hello_deadline:
                # A CURVE server gives a client without its keys nothing but this silence.
                self._reconnect("no answer to Hello" if self.security is not None else
                                "no answer to Hello (is the server up? one started with --keys answers only "
                                "robots configured with its keys)")
            elif self._in_flight is None:  # Hello not sent yet: no connection so far
                self._send_hello()
            return
        if self._in_flight is not None and now - self._in_flight[2] > self._in_flight[3]:
            kind, _, _, allowed = self._in_flight
            if kind == "obs" and self._startup_pending:
                self._startup_misses += 1
                kind = "the start-up obs"
            self._reconnect(f"no answer to {kind} within {allowed:.3f} s")
        elif self._heartbeat_sent is not None and now - self._heartbeat_sent > self.timeout_s:
            self._reconnect(f"no answer to heartbeat within {self.timeout_s:.3f} s")
        elif self._in_flight is None and self._heartbeat_sent is None and now - self._last_activity > self.heartbeat_s:
            if self._send(Heartbeat(time.time())):
                self._heartbeat_sent = now

    def _handle(self, frames) -> ActionReply | None:
        try:
            msg = decode(frames, self.limits, accept=SERVER_MESSAGES)
        except ProtocolError as e:
            log.warning("bad message from server: %s", e)
            self.errors.append(Error.from_exception(e))
            return None
        now = time.perf_counter()
        if isinstance(msg, HelloAck):
            if self.state is ClientState.HANDSHAKING:
                self.state = ClientState.READY
                self.session_id = msg.session_id
                self.policy = msg.policy
                self._in_flight = None
                self._last_activity = now
                self._startup_pending = True   # a new session: its first chunk is a start-up
                self._flush_reset()
            return None
        if isinstance(msg, Error):
            return self._handle_error(msg)
        if isinstance(msg, ActionReply):
            if self._in_flight is None or self._in_flight[:2] != ("obs", msg.seq):
                return None  # late answer to an observation we gave up on
            latency = now - self._in_flight[2]
            self._in_flight = None
            self._startup_pending = False
            self._startup_misses = 0
            try:
                check_actions(msg, self.spec.action)
            except ProtocolError as e:
                self.errors.append(Error.from_exception(e, msg.seq))
                return None
            self.latencies_s.append(latency)
            return msg
        if isinstance(msg, HeartbeatAck):
            self._heartbeat_sent = None
        elif isinstance(msg, ResetAck):
            self.episode = msg.episode
        elif isinstance(msg, Stats):
            self.last_stats = msg.stats
        elif isinstance(msg, Bye):
            self._reconnect(f"server said bye ({msg.reason})")
        return None

    def _handle_error(self, err: Error) -> None:
        self.errors.append(err)
        log.warning("server error %s: %s", err.code, err.message)
        if err.code == ErrorCode.SPEC_MISMATCH.value:
            self.fatal = err
            self._close_socket()
            self.state = ClientState.DISCONNECTED
        elif err.code == ErrorCode.NO_SESSION.value or self.state is ClientState.HANDSHAKING:
            # Server restarted or timed our session out: handshake again on this socket
            # (after the back-off when the Hello itself was refused).
            if self.state is ClientState.HANDSHAKING:
                self._reconnect(f"handshake refused: {err.code}")
            else:
                self._start_handshake()
        elif self._in_flight is not None and (err.seq is None or err.seq == self._in_flight[1]):
            self._in_flight = None
        return None
