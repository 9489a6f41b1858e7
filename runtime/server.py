"""Policy server: one ROUTER socket serving several robots, each in its own session.

A session belongs to one peer (ZeroMQ routing identity) and one robot id, and
owns its own policy state (observation history, sampler state, RNG) made by the
`SessionFactory`. Any bad message gets an `Error` reply to its sender only; the
server keeps serving everyone else. Sessions idle longer than the timeout are
dropped (the robot then gets NO_SESSION and says Hello again).

The server is single-threaded: it drains every waiting message, then handles
them in arrival order, so "queueing ms" (receive -> start of compute) shows how
long a robot waited behind the others.
"""
from __future__ import annotations

import collections
import json
import gc
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import zmq

from dpstack.core.process import announce_ready
from dpstack.runtime.endpoint import EndpointError, bind, is_loopback_endpoint  # noqa: F401 (re-exported)
from dpstack.runtime.protocol import (DEFAULT_LIMITS, ActionReply, Bye, Error, ErrorCode, Heartbeat, HeartbeatAck,
                              Hello, HelloAck, Limits, Message, Observation, PolicyInfo, ProtocolError, Reset,
                              ResetAck, Stats, StatsRequest, check_arrays, decode, encode)
from dpstack.core.spec import RobotSpec, SpecMismatch
from dpstack.core.stats import summarize_ms

log = logging.getLogger(__name__)

CLIENT_MESSAGES = (Hello, Observation, Reset, Heartbeat, Bye, StatsRequest)


class PolicySession(Protocol):
    """One robot's policy state (runtime.policy.PolicyRunner is one).

    `act` returns an ActionChunk-like object (runtime.policy.ActionChunk): `.actions`
    (n, A) in robot units, and optionally `.offsets` (n,) consecutive control steps
    after the observation's (actions[i] is for obs time + offsets[i] * dt),
    `.sampler` and `.nfe`. An optional `observe(obs)` records a history-only
    observation (infer=False); without it such observations are ignored."""

    def reset(self, seed: int | None = None) -> None: ...

    def act(self, obs: dict[str, np.ndarray]) -> Any: ...


@dataclass(frozen=True)
class PlainChunk:
    """What a policy without a sampler returns (the zero-action benchmark policy, test
    doubles): actions only; the server labels it with its PolicyInfo's sampler, 0 evaluations."""

    actions: np.ndarray


SessionFactory = Callable[[RobotSpec], PolicySession]
# Configures authentication on the ROUTER socket before bind (runtime.auth.CurveServer:
# CurveZMQ with a client-key allow-list). With it, non-loopback binds are allowed;
# an object with a stop() method is stopped when the server closes.
SocketSecurity = Callable[[zmq.Socket], None]


class InsecureBind(ValueError):
    """A bind that would expose an unauthenticated policy server to the network."""


def check_bind(endpoint: str, insecure: bool = False, authenticated: bool = False) -> None:
    """Refuse a non-loopback bind unless it is authenticated or explicitly insecure."""
    if is_loopback_endpoint(endpoint) or authenticated:
        return
    if not insecure:
        raise InsecureBind(
            f"refusing to bind {endpoint}: not a loopback address, and anyone who can reach it could drive "
            "the robot; serve with --keys DIR to admit only robots whose keys you allowed (CurveZMQ: dpstack keys "
            "generate, dpstack keys allow), or, on a network you trust, serve unauthenticated with --insecure")
    log.warning("serving UNAUTHENTICATED on %s (--insecure)", endpoint)


@dataclass
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    insecure: bool = False
    session_timeout_s: float = 30.0
    stats_interval_s: float = 30.0
    max_sessions: int = 32
    limits: Limits = DEFAULT_LIMITS
    # libzmq drops the connection of a peer sending a frame over this (memory
    # guard); messages between limits.max_message_bytes and this get an Error.
    hard_frame_bytes: int = 4 * DEFAULT_LIMITS.max_message_bytes
    security: SocketSecurity | None = None


@dataclass
class Session:
    session_id: str
    identity: bytes
    robot_id: str
    spec: RobotSpec
    policy: PolicySession
    last_seen: float
    last_seq: int = -1
    episode: int = 0
    n_observations: int = 0


class Metrics:
    """Counters and recent timings; `summary()` is plain data (msgpack/JSON-able)."""

    def __init__(self, window: int = 10_000) -> None:
        self.started = time.time()
        self.messages: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.sessions: collections.Counter[str] = collections.Counter()
        self.compute_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.queue_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.n_chunks = 0
        self.n_history = 0

    def summary(self, active_sessions: int) -> dict[str, Any]:
        return {"uptime_s": time.time() - self.started, "chunks": self.n_chunks, "history_only": self.n_history,
                "active_sessions": active_sessions, "sessions": dict(self.sessions),
                "messages": dict(self.messages), "errors": dict(self.errors),
                "compute": summarize_ms(self.compute_ms), "queue": summarize_ms(self.queue_ms)}


class PolicyServer:
    def __init__(self, factory: SessionFactory, policy_spec: RobotSpec, info: PolicyInfo,
                 config: ServerConfig | None = None, context: zmq.Context | None = None) -> None:
        self.factory = factory
        self.policy_spec = policy_spec
        self.info = info
        self.config = config or ServerConfig()
        check_bind(self.config.bind, self.config.insecure, authenticated=self.config.security is not None)
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, self.config.hard_frame_bytes)
        if self.config.security is not None:
            self.config.security(self._socket)
        try:
            self.endpoint: str = bind(self._socket, self.config.bind)
        except EndpointError:
            self._release(linger_ms=0)
            raise
        self.sessions: dict[bytes, Session] = {}
        self.metrics = Metrics()
        self._dt = 1.0 / policy_spec.control_hz
        self._last_sweep = time.perf_counter()
        self._last_log = time.perf_counter()

    # ------------------------------------------------------------------ loop
    def serve(self, should_stop: Callable[[], bool], poll_ms: int = 100) -> None:
        """Serve until `should_stop()` is true (checked at least every `poll_ms`)."""
        # Everything loaded so far (the policy, onnxruntime sessions) stays put: later full
        # collections then scan only what serving allocates, not stall a control step.
        gc.collect()
        gc.freeze()
        while not should_stop():
            self.process(poll_ms)

    def process(self, timeout_ms: int = 100, max_batch: int = 1000) -> int:
        """Wait up to `timeout_ms` for traffic, handle all of it; return messages handled."""
        batch = []
        if self._socket.poll(timeout_ms, zmq.POLLIN):
            while len(batch) < max_batch:
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                batch.append((time.perf_counter(), frames))
        for t_recv, frames in batch:
            self._handle(t_recv, frames)
        self._housekeeping()
        return len(batch)

    def stats(self) -> dict[str, Any]:
        return self.metrics.summary(len(self.sessions))

    def close(self) -> dict[str, Any]:
        """Say Bye to every robot, close the socket; return the final stats."""
        for s in list(self.sessions.values()):
            self._send([s.identity], Bye("server shutting down"))
        self.sessions.clear()
        self._release(linger_ms=500)  # long enough for the byes to leave, never a hang
        return self.stats()

    def _release(self, linger_ms: int) -> None:
        self._socket.close(linger=linger_ms)
        stop = getattr(self.config.security, "stop", None)
        if callable(stop):  # e.g. runtime.auth.CurveServer's ZAP thread, which would block term()
            stop()
        if self._own_context:
            self._context.term()  # waits (up to the linger) until the byes are out

    # ------------------------------------------------------------------ handling
    def _handle(self, t_recv: float, frames: list) -> None:
        envelope = [frames[0].bytes]
        body = frames[1:]
        if len(body) >= 2 and len(body[0]) == 0:  # REQ-style empty delimiter: echo it back
            envelope.append(b"")
            body = body[1:]
        seq = None
        try:
            msg = decode(body, self.config.limits, accept=CLIENT_MESSAGES)
            self.metrics.messages[msg.TYPE] += 1
            seq = getattr(msg, "seq", None)
            reply = self._dispatch(envelope[0], msg, t_recv)
        except ProtocolError as e:
            self.metrics.errors[e.code.value] += 1
            reply = Error.from_exception(e, seq)
        except Exception as e:  # a bug or a failing policy must not stop the others' service
            log.exception("internal error handling a message")
            self.metrics.errors[ErrorCode.INTERNAL.value] += 1
            reply = Error(ErrorCode.INTERNAL.value, f"{type(e).__name__}: {e}"[:500], seq)
        if reply is not None:
            self._send(envelope, reply)

    def _send(self, envelope: list[bytes], msg: Message) -> None:
        try:
            # ROUTER drops silently when the peer is gone or its queue is full: never blocks.
            self._socket.send_multipart(envelope + encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            log.debug("reply not sent: %s", e)

    def _dispatch(self, identity: bytes, msg: Message, t_recv: float) -> Message | None:
        if isinstance(msg, Hello):
            return self._hello(identity, msg)
        if isinstance(msg, StatsRequest):
            return Stats(self.stats())
        session = self.sessions.get(identity)
        if session is None:
            if isinstance(msg, Bye):
                return None
            raise ProtocolError(ErrorCode.NO_SESSION, "no open session for this peer (new, timed out or server restarted): send hello")
        session.last_seen = time.perf_counter()
        if isinstance(msg, Observation):
            return self._observe(session, msg, t_recv)
        if isinstance(msg, Reset):
            try:
                session.policy.reset(msg.seed)
            except Exception as e:  # the seed was checked at decode: this is the policy's failure
                log.exception("policy reset failed for robot %r", session.robot_id)
                raise ProtocolError(ErrorCode.POLICY_ERROR, f"reset failed: {type(e).__name__}: {e}"[:500]) from None
            session.episode += 1
            return ResetAck(session.episode)
        if isinstance(msg, Heartbeat):
            return HeartbeatAck(msg.timestamp, time.time())
        if isinstance(msg, Bye):
            self._drop(session, "bye")
            return None
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"message type {msg.TYPE!r} not accepted by the server")

    def _hello(self, identity: bytes, msg: Hello) -> Message:
        try:
            self.policy_spec.check_serves(msg.spec)
        except SpecMismatch as e:
            raise ProtocolError(ErrorCode.SPEC_MISMATCH, str(e)[:self.config.limits.max_string]) from None
        # A robot that reconnects (new socket, new identity) replaces its old session.
        for s in list(self.sessions.values()):
            if s.identity == identity or s.robot_id == msg.robot_id:
                self._drop(s, "replaced by a new hello")
        if len(self.sessions) >= self.config.max_sessions:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS, f"server holds its maximum of {self.config.max_sessions} sessions")
        try:
            policy = self.factory(msg.spec)
            policy.reset(msg.seed)
        except Exception as e:
            log.exception("policy session creation failed")
            raise ProtocolError(ErrorCode.POLICY_ERROR, f"could not create a policy session: {type(e).__name__}: {e}"[:500]) from None
        session = Session(uuid.uuid4().hex, identity, msg.robot_id, msg.spec, policy, time.perf_counter())
        self.sessions[identity] = session
        self.metrics.sessions["opened"] += 1
        log.info("session %s opened for robot %r", session.session_id[:8], msg.robot_id)
        return HelloAck(session.session_id, self.info)

    def _observe(self, session: Session, msg: Observation, t_recv: float) -> Message | None:
        if msg.seq <= session.last_seq:
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"observation seq {msg.seq} not after {session.last_seq}")
        check_arrays(msg.arrays, session.spec.observations)
        session.last_seq = msg.seq
        obs = {k: msg.arrays[k] for k in self.policy_spec.obs_keys}
        t0 = time.perf_counter()
        try:
            if not msg.infer:
                observe = getattr(session.policy, "observe", None)
                if observe is not None:
                    observe(obs)
                self.metrics.n_history += 1
                return None
            result = session.policy.act(obs)
        except Exception as e:
            log.exception("policy failed on observation %d of robot %r", msg.seq, session.robot_id)
            raise ProtocolError(ErrorCode.POLICY_ERROR, f"{type(e).__name__}: {e}"[:500]) from None
        t1 = time.perf_counter()
        actions = np.asarray(getattr(result, "actions", result), dtype=np.float32)
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1:] != self.policy_spec.action.shape \
                or not np.isfinite(actions).all():
            raise ProtocolError(ErrorCode.POLICY_ERROR, f"policy produced unusable actions {actions.shape} (finite: {np.isfinite(actions).all()})")
        compute_ms = (t1 - t0) * 1e3
        self.metrics.compute_ms.append(compute_ms)
        self.metrics.queue_ms.append((t0 - t_recv) * 1e3)
        self.metrics.n_chunks += 1
        session.n_observations += 1
        offsets = getattr(result, "offsets", None)
        if offsets is None:
            offset = 0
        else:
            offsets = np.asarray(offsets)
            if offsets.shape != (len(actions),) or np.any(np.diff(offsets) != 1):
                raise ProtocolError(ErrorCode.POLICY_ERROR, f"policy offsets {offsets.tolist()} are not consecutive steps, one per action")
            offset = int(offsets[0])
        return ActionReply(seq=msg.seq, start_time=msg.timestamp + offset * self._dt, dt=self._dt, actions=actions,
                           sampler=str(getattr(result, "sampler", self.info.sampler)), compute_ms=compute_ms,
                           nfe=int(getattr(result, "nfe", 0) or 0), replan_after=getattr(result, "replan_after", None))

    def _drop(self, session: Session, why: str) -> None:
        self.sessions.pop(session.identity, None)
        self.metrics.sessions["closed_" + why.split()[0]] += 1
        log.info("session %s of robot %r closed: %s", session.session_id[:8], session.robot_id, why)

    def _housekeeping(self) -> None:
        now = time.perf_counter()
        if now - self._last_sweep >= min(1.0, self.config.session_timeout_s / 4):
            self._last_sweep = now
            for s in list(self.sessions.values()):
                if now - s.last_seen > self.config.session_timeout_s:
                    self._drop(s, "timeout (inactive)")
        if now - self._last_log >= self.config.stats_interval_s:
            self._last_log = now
            log.info("stats %s", json.dumps(self.stats(), sort_keys=True))


def run_until_signalled(server: PolicyServer) -> dict[str, Any]:
    """Announce readiness, serve until SIGINT/SIGTERM, then close and return the final stats,
    with `stopped_by` naming the signal (SIGINT: a person pressed Ctrl-C; SIGTERM: a service stop)."""
    import signal

    stop: dict[str, str] = {}

    def on_signal(signum, frame) -> None:
        stop.setdefault("by", signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        info = server.info
        startup = "" if info.startup_s is None else f"; a session's first chunk takes {info.startup_s:.2f} s"
        log.info("serving %s (%s%s) on %s%s", info.name, info.sampler,
                 f" = {info.sampler_resolved}" if info.sampler_resolved not in ("", info.sampler) else "", server.endpoint,
                 startup)
        announce_ready(endpoint=server.endpoint, policy=info.name, sampler=info.sampler,
                       sampler_resolved=info.sampler_resolved)
        server.serve(lambda: bool(stop))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        summary = server.close()
    return {**summary, "stopped_by": stop.get("by", "")}
