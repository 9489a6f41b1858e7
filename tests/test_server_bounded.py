"""The server's per-connection state stays bounded however many times robots come and go
(issue 18's soak: memory must stay flat). Counted, not timed: every robot reconnects
with a new ZeroMQ identity, half of them without a Bye, some with messages still queued."""
from __future__ import annotations

import numpy as np
import zmq

from dpstack.runtime.protocol import ActionReply, Bye, Hello, Observation, decode, encode
from dpstack.runtime.server import PolicyServer, ServerConfig
from echo_server import ECHO_SPEC, EchoPolicy, SleepDenoiser, echo_info, echo_observation

ROBOTS = 4
GENERATIONS = 25


def connect(server: PolicyServer, robot_id: str, seed: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)  # a new socket: a new routing identity
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    sock.send_multipart(encode(Hello(robot_id, ECHO_SPEC, seed=seed)))
    return sock


def until_chunk(server: PolicyServer, sock: zmq.Socket, max_rounds: int = 500) -> None:
    for _ in range(max_rounds):
        server.process(timeout_ms=20)
        while sock.poll(0):
            if isinstance(decode(sock.recv_multipart()), ActionReply):
                return
    raise AssertionError("no chunk")


def test_robots_that_reconnect_or_vanish_leave_no_sessions_queues_or_work_behind():
    server = PolicyServer(lambda spec: EchoPolicy(denoise=SleepDenoiser(0.0), evals=2), ECHO_SPEC, echo_info(),
                          ServerConfig(bind="tcp://127.0.0.1:*"))
    rng = np.random.default_rng(0)
    try:
        for generation in range(GENERATIONS):
            socks = [connect(server, f"robot-{i}", seed=generation) for i in range(ROBOTS)]
            for sock in socks:
                sock.send_multipart(encode(Observation(1, 0.0, echo_observation(rng))))
                until_chunk(server, sock)
            for i, sock in enumerate(socks):
                # Leave work behind: one more chunk asked for and history queued, then gone.
                sock.send_multipart(encode(Observation(2, 0.05, echo_observation(rng))))
                sock.send_multipart(encode(Observation(3, 0.10, echo_observation(rng), infer=False)))
                if i % 2:
                    sock.send_multipart(encode(Bye("leaving")))
                server.process(timeout_ms=20)
                sock.close()
            # The server holds at most one session, one queue and one chunk per robot it serves.
            assert len(server.sessions) <= ROBOTS
            assert len(server._inbox) <= 2 * ROBOTS and len(server._work) <= 2 * ROBOTS
        for _ in range(50):   # drain what the vanished connections left queued
            server.process(timeout_ms=5)
        # The robots that left without a Bye keep their last sessions until the idle timeout
        # or their next Hello; nothing else is left.
        assert len(server.sessions) <= ROBOTS // 2
        assert not server._inbox and not server._work
        opened = server.stats()["sessions"]
        assert opened["opened"] == ROBOTS * GENERATIONS
        assert opened["opened"] - len(server.sessions) == sum(v for k, v in opened.items() if k.startswith("closed_"))
    finally:
        server.close()
