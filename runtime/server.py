"""Policy server: one ROUTER socket serving several robots, each in its own session.

A session belongs to one peer (ZeroMQ routing identity) and one robot id, and
owns its own policy state (observation history, sampler state, RNG) made by the
`SessionFactory`. Any bad message gets an `Error` reply to its sender only; the
server keeps serving everyone else. Sessions idle longer than the timeout are
dropped (the robot then gets NO_SESSION and says Hello again).

The server is single-threaded. Two schedulings (ServerConfig.scheduling):
- "batched" (default): messages wait in a queue per connection. Each round gives
  every connection in turn a bounded share of its messages, then runs ONE denoiser
  call for every robot whose chunk is being computed (one evaluation each), so a
  start-up full denoise advances one evaluation per round beside the other robots'
  control steps instead of ahead of them. A robot waits at most one round for its
  computation to start, and a flood from one connection fills only its own queue
  (the oldest of its messages are dropped).
- "serial": today's one-at-a-time order: drain every waiting message and handle
  them in arrival order, each robot's chunk computed whole.
"Queueing ms" (receive -> start of compute) shows how long a robot waited behind the others.
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
from dpstack.core.stats import summarize, summarize_ms
from dpstack.runtime.samplers import DenoiseRequest, DenoiseSteps, denoise_requests

log = logging.getLogger(__name__)

CLIENT_MESSAGES = (Hello, Observation, Reset, Heartbeat, Bye, StatsRequest)
SCHEDULINGS = ("batched", "serial")


class PolicySession(Protocol):
    """One robot's policy state (runtime.policy.PolicyRunner is one).

    `act` returns an ActionChunk-like object (runtime.policy.ActionChunk): `.actions`
    (n, A) in robot units, and optionally `.offsets` (n,) consecutive control steps
    after the observation's (actions[i] is for obs time + offsets[i] * dt),
    `.sampler` and `.nfe`. An optional `observe(obs)` records a history-only
    observation (infer=False); without it such observations are ignored."""

    def reset(self, seed: int | None = None) -> None: ...

    def act(self, obs: dict[str, np.ndarray]) -> Any: ...

    # Optional, for batched scheduling (PolicyRunner has them): `act_gen(obs)`, act as a
    # generator yielding samplers.DenoiseRequest and taking eps back; `denoise`, the
    # callable that answers them (sessions sharing it are batched together); `max_batch`,
    # rows per call (0: any). A session without act_gen is computed whole with act().


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
    scheduling: str = "batched"       # or "serial" (see the module docstring)
    batch_window_ms: float = 0.0      # batched: wait this long for more robots before a round's denoiser call
    messages_per_round: int = 8       # batched: messages one connection gets handled per round
    inbox_limit: int = 1000           # batched: messages queued per connection (as ZeroMQ's own receive queue); beyond, its oldest are dropped

    def __post_init__(self) -> None:
        if self.scheduling not in SCHEDULINGS:
            raise ValueError(f"scheduling must be one of {list(SCHEDULINGS)}, got {self.scheduling!r}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch window must be >= 0 ms, got {self.batch_window_ms}")


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


@dataclass
class _Work:
    """A chunk being computed under batched scheduling, one denoiser request at a time."""

    session: Session
    envelope: list[bytes]
    msg: Observation
    t_recv: float
    t_start: float
    steps: DenoiseSteps
    request: DenoiseRequest | None = None


class Metrics:
    """Counters and recent timings; `summary()` is plain data (msgpack/JSON-able)."""

    def __init__(self, window: int = 10_000) -> None:
        self.started = time.time()
        self.messages: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.sessions: collections.Counter[str] = collections.Counter()
        self.compute_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.queue_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=window)  # rows of each denoiser call
        self.n_chunks = 0
        self.n_history = 0
        self.n_dropped = 0   # batched: messages dropped from a full connection queue

    def summary(self, active_sessions: int) -> dict[str, Any]:
        return {"uptime_s": time.time() - self.started, "chunks": self.n_chunks, "history_only": self.n_history,
                "active_sessions": active_sessions, "sessions": dict(self.sessions),
                "messages": dict(self.messages), "errors": dict(self.errors), "dropped": self.n_dropped,
                "compute": summarize_ms(self.compute_ms), "queue": summarize_ms(self.queue_ms),
                "batch": summarize(self.batch_sizes)}


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
        self._inbox: dict[bytes, collections.deque] = {}   # batched: waiting messages per connection, in turn order
        self._work: dict[bytes, _Work] = {}                 # batched: chunks in computation per connection

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
        """Wait up to `timeout_ms` for traffic (not at all while work waits), handle it; return
        messages received. Batched: one round (see the module docstring)."""
        if self.config.scheduling == "serial":
            return self._process_serial(timeout_ms, max_batch)
        n = self._receive(0 if self._work or self._inbox else timeout_ms, max_batch)
        self._admit()
        if self.config.batch_window_ms > 0 and self._work:
            deadline = time.perf_counter() + self.config.batch_window_ms / 1e3
            while (left_ms := (deadline - time.perf_counter()) * 1e3) > 0:
                n += self._receive(max(1, int(left_ms)), max_batch)
            self._admit()
        self._round()
        self._housekeeping()
        return n

    def _receive(self, timeout_ms: int, max_n: int) -> int:
        """Queue what arrives per connection; a full queue drops its own oldest message."""
        n = 0
        if self._socket.poll(timeout_ms, zmq.POLLIN):
            while n < max_n:
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                n += 1
                queue = self._inbox.setdefault(frames[0].bytes, collections.deque())
                queue.append((time.perf_counter(), frames))
                if len(queue) > self.config.inbox_limit:
                    queue.popleft()
                    self.metrics.n_dropped += 1
        return n

    def _admit(self) -> None:
        """Round robin: each connection with no chunk in computation gets up to
        messages_per_round of its messages handled, then goes to the back of the turn order."""
        for identity in list(self._inbox):
            queue = self._inbox.pop(identity)
            for _ in range(self.config.messages_per_round):
                if not queue or identity in self._work:
                    break
                self._handle(*queue.popleft())
            if queue:
                self._inbox[identity] = queue

    def _round(self) -> None:
        """One denoiser call per shared denoiser for every chunk in computation, then advance them."""
        groups: dict[Any, list[_Work]] = {}
        for work in self._work.values():
            groups.setdefault(work.session.policy.denoise, []).append(work)
        for denoise, works in groups.items():
            max_batch = int(getattr(works[0].session.policy, "max_batch", 0) or 0)
            requests = [w.request for w in works]
            try:
                answers: list = denoise_requests(denoise, requests, max_batch)
                per_call = max_batch or len(requests)
                self.metrics.batch_sizes.extend(min(per_call, len(requests) - i) for i in range(0, len(requests), per_call))
            except Exception:  # one bad request must not fail the others: answer each alone
                answers = [self._answer_alone(denoise, r) for r in requests]
            for work, eps in zip(works, answers):
                self._continue(work, eps)

    def _answer_alone(self, denoise: Any, request: DenoiseRequest) -> np.ndarray | Exception:
        try:
            eps = denoise(request.x, request.t, request.cond)
            self.metrics.batch_sizes.append(1)
            return eps
        except Exception as e:
            return e

    def _continue(self, work: _Work, eps: np.ndarray | Exception) -> None:
        """Give a chunk in computation its eps; reply once its sampler is done."""
        session = work.session
        try:
            if isinstance(eps, Exception):
                raise eps
            done, result = self._advance(work, eps)
            if not done:
                return
            reply = self._chunk_reply(session, work.msg, result, work.t_recv, work.t_start)
        except ProtocolError as e:
            reply = self._error(e, work.msg.seq)
        except Exception as e:
            reply = self._error(self._policy_failed(e, session, work.msg), work.msg.seq)
        self._work.pop(session.identity, None)
        self._send(work.envelope, reply)

    @staticmethod
    def _advance(work: _Work, eps: np.ndarray | None) -> tuple[bool, Any]:
        """Run the chunk's computation to its next denoiser request: (done, its result)."""
        try:
            work.request = work.steps.send(eps)
            return False, None
        except StopIteration as done:
            return True, done.value

    def _process_serial(self, timeout_ms: int, max_batch: int) -> int:
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
            reply = self._dispatch(envelope, msg, t_recv)
        except Exception as e:  # a bug or a failing policy must not stop the others' service
            reply = self._error(e, seq)
        if reply is not None:
            self._send(envelope, reply)

    def _error(self, e: Exception, seq: int | None) -> Error:
        """The Error reply for a failure, counted by its code (anything not a ProtocolError is `internal`)."""
        if isinstance(e, ProtocolError):
            self.metrics.errors[e.code.value] += 1
            return Error.from_exception(e, seq)
        log.exception("internal error handling a message", exc_info=e)
        self.metrics.errors[ErrorCode.INTERNAL.value] += 1
        return Error(ErrorCode.INTERNAL.value, f"{type(e).__name__}: {e}"[:500], seq)

    @staticmethod
    def _policy_failed(e: Exception, session: Session, msg: Observation) -> ProtocolError:
        log.error("policy failed on observation %d of robot %r", msg.seq, session.robot_id, exc_info=e)
        return ProtocolError(ErrorCode.POLICY_ERROR, f"{type(e).__name__}: {e}"[:500])

    def _send(self, envelope: list[bytes], msg: Message) -> None:
        try:
            # ROUTER drops silently when the peer is gone or its queue is full: never blocks.
            self._socket.send_multipart(envelope + encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            log.debug("reply not sent: %s", e)

    def _dispatch(self, envelope: list[bytes], msg: Message, t_recv: float) -> Message | None:
        identity = envelope[0]
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
            return self._observe(session, envelope, msg, t_recv)
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

    def _observe(self, session: Session, envelope: list[bytes], msg: Observation, t_recv: float) -> Message | None:
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
            batched = self.config.scheduling == "batched" and getattr(session.policy, "denoise", None) is not None
            act_gen = getattr(session.policy, "act_gen", None) if batched else None
            if act_gen is None:
                result = session.policy.act(obs)
            else:  # computed over the next rounds, one denoiser evaluation each
                work = _Work(session, envelope, msg, t_recv, t0, act_gen(obs))
                done, result = self._advance(work, None)
                if not done:
                    self._work[session.identity] = work
                    return None
        except Exception as e:
            raise self._policy_failed(e, session, msg) from None
        return self._chunk_reply(session, msg, result, t_recv, t0)

    def _chunk_reply(self, session: Session, msg: Observation, result: Any, t_recv: float, t0: float) -> ActionReply:
        """The reply for a computed chunk (checked), with its compute and queueing times counted."""
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
        self._work.pop(session.identity, None)
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
