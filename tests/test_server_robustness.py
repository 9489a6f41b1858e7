"""A real server subprocess keeps serving well-formed robots while others send it
garbage: every bad message gets an Error with the right code, nothing crashes."""
from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from dpstack.runtime.client import PolicyClient
from dpstack.runtime.protocol import (ActionReply, Error, ErrorCode, Hello, Observation, decode, encode)
from echo_server import ECHO_SPEC, EchoPolicy, echo_observation
from server_process import ServerProcess


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as s:
        yield s


def raw_socket(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 3000)
    s.setsockopt(zmq.SNDTIMEO, 3000)
    s.connect(endpoint)
    return s


def ask(sock: zmq.Socket, frames) -> object:
    sock.send_multipart(frames)
    return decode(sock.recv_multipart())


class GoodRobot:
    """A well-formed robot whose every reply is checked against a local EchoPolicy."""

    def __init__(self, endpoint: str, robot_id: str, seed: int) -> None:
        self.client = PolicyClient(endpoint, ECHO_SPEC, robot_id, seed=seed, timeout_s=3.0, heartbeat_s=30.0)
        assert self.client.wait_ready(5.0), self.client.errors
        self.expected = EchoPolicy()
        self.expected.reset(seed)
        self.rng = np.random.default_rng(seed)
        self.n_ok = 0

    def step(self) -> None:
        obs = echo_observation(self.rng)
        t = time.monotonic()
        reply = self.client.request(obs, t, timeout_s=5.0)
        assert isinstance(reply, ActionReply), list(self.client.errors)[-3:]
        np.testing.assert_array_equal(reply.actions, self.expected.act(obs).actions)
        assert reply.start_time == pytest.approx(t) and reply.dt == pytest.approx(1 / ECHO_SPEC.control_hz)
        self.n_ok += 1


def _obs_frames(arrays, seq=1, **header_over) -> list[bytes]:
    frames = [bytes(f) for f in encode(Observation(seq, 0.0, arrays))]
    if header_over:
        h = msgpack.unpackb(frames[0])
        h.update(header_over)
        frames[0] = msgpack.packb(h)
    return frames


def bad_messages(rng: np.random.Generator) -> dict[str, tuple[list[bytes], ErrorCode]]:
    good = echo_observation(rng)
    nan_state = {**good, "state": np.array([0, np.nan, 0, 0], np.float32)}
    return {
        "random bytes": ([rng.bytes(40)], ErrorCode.BAD_FRAMING),
        "wrong version": (_obs_frames(good, v=99), ErrorCode.BAD_VERSION),
        "unknown type": (_obs_frames(good, type="launch_missiles"), ErrorCode.UNKNOWN_TYPE),
        "server-only type": ([bytes(f) for f in encode(Error("x", "y"))], ErrorCode.UNKNOWN_TYPE),
        "wrong shape": (_obs_frames({**good, "state": np.zeros(5, np.float32)}, seq=10**6), ErrorCode.BAD_SHAPE),
        "wrong dtype": (_obs_frames({**good, "image": good["image"].astype(np.float32)}, seq=10**6), ErrorCode.BAD_DTYPE),
        "missing key": (_obs_frames({"state": good["state"]}, seq=10**6), ErrorCode.MISSING_KEY),
        "NaN": (_obs_frames(nan_state), ErrorCode.NOT_FINITE),
        "bad header type": (_obs_frames(good, seq="one"), ErrorCode.BAD_HEADER),
    }


def test_each_kind_of_bad_message_gets_its_error_and_service_goes_on(server) -> None:
    rng = np.random.default_rng(0)
    robot = GoodRobot(server.endpoint, "good", seed=1)
    bad = raw_socket(server.endpoint)
    # a session, so shape checks are reached (observations without one get NO_SESSION)
    assert ask(bad, encode(Hello("bad", ECHO_SPEC))).TYPE == "hello_ack"
    for name, (frames, code) in bad_messages(rng).items():
        reply = ask(bad, frames)
        assert isinstance(reply, Error) and reply.code == code.value, (name, reply)
        robot.step()
    # oversize: 17 MiB > the 16 MiB default limit, answered with an error
    big = np.zeros(17 * 2**20, np.uint8)
    reply = ask(bad, _obs_frames({"image": big}, seq=10**7))
    assert isinstance(reply, Error) and reply.code == ErrorCode.TOO_LARGE.value
    # the bad robot's own session survives its errors: a good observation still works
    reply = ask(bad, encode(Observation(10**8, 0.0, echo_observation(rng))))
    assert isinstance(reply, ActionReply) and reply.seq == 10**8
    # replayed/old sequence numbers are refused
    reply = ask(bad, encode(Observation(5, 0.0, echo_observation(rng))))
    assert isinstance(reply, Error) and reply.code == ErrorCode.OUT_OF_ORDER.value
    bad.close()
    robot.step()
    robot.client.close()


def test_observation_without_session_and_spec_mismatch(server) -> None:
    sock = raw_socket(server.endpoint)
    reply = ask(sock, encode(Observation(1, 0.0, echo_observation(np.random.default_rng(0)))))
    assert isinstance(reply, Error) and reply.code == ErrorCode.NO_SESSION.value
    other = ECHO_SPEC.to_dict()
    other["observations"][0]["shape"] = [6]
    from dpstack.core.spec import RobotSpec
    reply = ask(sock, encode(Hello("wrong", RobotSpec.from_dict(other))))
    assert isinstance(reply, Error) and reply.code == ErrorCode.SPEC_MISMATCH.value and "state" in reply.message
    sock.close()
    # the client treats a mismatch as fatal instead of retrying forever
    client = PolicyClient(server.endpoint, RobotSpec.from_dict(other), "wrong", timeout_s=2.0)
    assert not client.wait_ready(3.0)
    assert client.fatal is not None and client.fatal.code == ErrorCode.SPEC_MISMATCH.value
    client.close()


def test_frame_over_hard_cap_drops_only_that_peer(server) -> None:
    robot = GoodRobot(server.endpoint, "good-cap", seed=3)
    huge = raw_socket(server.endpoint)
    huge.send_multipart([msgpack.packb({"v": 1, "type": "observation"}), b"\0" * (65 * 2**20)])
    robot.step()
    robot.step()
    huge.close()
    robot.client.close()


def test_burst_of_10000_mixed_bad_messages_while_a_good_robot_is_served(server) -> None:
    rng = np.random.default_rng(7)
    catalogue = list(bad_messages(rng).values())
    robot = GoodRobot(server.endpoint, "good-burst", seed=11)
    errors: dict[str, int] = {}
    failures: list[BaseException] = []
    sent = [0]

    def receive(sock: zmq.Socket) -> None:
        frames = sock.recv_multipart()
        if frames[0] == b"":  # we sent a leading empty frame: the server echoed it as a REQ delimiter
            frames = frames[1:]
        msg = decode(frames)
        key = getattr(msg, "code", msg.TYPE)
        errors[key] = errors.get(key, 0) + 1

    def flood() -> None:
        try:
            sock = raw_socket(server.endpoint)
            sock.send_multipart(encode(Hello("flooder", ECHO_SPEC)))
            for i in range(10_000):
                frames, _ = catalogue[i % len(catalogue)]
                if i % 97 == 0:
                    frames = [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(1, 4)))]
                sock.send_multipart(frames)
                sent[0] += 1
                # at most 500 unanswered, so no queue on either side overflows (ROUTER drops on overflow)
                while sock.poll(0 if sent[0] - sum(errors.values()) < 500 else 2000):
                    receive(sock)
                    if sent[0] - sum(errors.values()) < 500:
                        break
            deadline = time.monotonic() + 10
            while sum(errors.values()) < 10_001 and time.monotonic() < deadline:
                if sock.poll(200):
                    receive(sock)
            sock.close()
        except BaseException as e:  # surfaced by the main thread
            failures.append(e)

    flooder = threading.Thread(target=flood)
    flooder.start()
    while flooder.is_alive():
        robot.step()
    flooder.join()
    assert not failures, failures
    robot.step()
    assert sent[0] == 10_000
    assert robot.n_ok >= 5
    assert sum(errors.values()) == 10_001, errors  # every message answered: 10,000 errors + the hello_ack
    for code in ("bad_framing", "bad_version", "unknown_type", "bad_shape", "bad_dtype", "missing_key",
                 "not_finite", "bad_header"):
        assert errors.get(code, 0) > 0, (code, errors)
    stats = robot.client.request_stats(2.0)
    assert stats is not None and sum(stats["errors"].values()) >= 10_000
    robot.client.close()
