"""Fair under load: one well-formed robot beside four hostile connections (malformed
messages, hellos, resets, and observations that start start-up denoises) keeps its
answer latency p99 under 2x what it is alone, measured in the same run."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from dpstack.runtime.client import PolicyClient
from dpstack.runtime.protocol import ActionReply, Hello, Observation, Reset, encode
from echo_server import ECHO_SPEC, EchoPolicy, echo_observation
from server_process import ServerProcess

# A chunk costs 3 denoiser calls of 5 ms (like RTI's three refinements), an episode's first 20 more.
SERVER_ARGS = ("--denoise-ms", "5", "--evals", "3", "--startup-evals", "20")


def hostile(endpoint: str, n: int, stop: threading.Event) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    rng = np.random.default_rng(n)
    good = encode(Observation(1, 0.0, echo_observation(rng)))
    burst = [encode(Hello(f"hostile-{n}", ECHO_SPEC)), good, [rng.bytes(30)], encode(Reset(seed=n)),
             [b"\x93\x01\x02"], [*good[:-1], b"short"], encode(Hello(f"hostile-{n}", ECHO_SPEC)), good]
    seq = 1
    while not stop.is_set():
        for frames in burst:
            if frames is good:  # a fresh seq each time, so it is accepted and starts a start-up denoise
                seq += 1
                frames = encode(Observation(seq, 0.0, echo_observation(rng)))
            sock.send_multipart(frames, zmq.NOBLOCK)
        deadline = time.monotonic() + 0.005
        while sock.poll(max(0, int((deadline - time.monotonic()) * 1e3))):
            sock.recv_multipart()
    sock.close()


def latencies(client: PolicyClient, expected: EchoPolicy, rng: np.random.Generator, n: int) -> np.ndarray:
    out = []
    for _ in range(n):
        obs = echo_observation(rng)
        t = time.perf_counter()
        reply = client.request(obs, time.monotonic(), timeout_s=5.0)
        out.append(time.perf_counter() - t)
        assert isinstance(reply, ActionReply), list(client.errors)[-3:]
        np.testing.assert_array_equal(reply.actions, expected.act(obs).actions)
    return np.array(out)


def test_four_hostile_connections_cost_a_robot_less_than_twice_its_latency_alone():
    # Alone and loaded are measured back to back, up to three times: the hostile threads share
    # this process and its cores with the robot, so one noisy pair must not decide; a server
    # that lets a flood or a start-up delay the robot fails every pair (serial: no answer at all).
    ratios = []
    with ServerProcess(args=SERVER_ARGS) as server:
        client = PolicyClient(server.endpoint, ECHO_SPEC, "good", seed=3, timeout_s=5.0, heartbeat_s=30.0)
        assert client.wait_ready(5.0), client.errors
        expected = EchoPolicy()
        expected.reset(3)
        rng = np.random.default_rng(3)
        latencies(client, expected, rng, 1)  # the episode's start-up
        for _ in range(3):
            alone = latencies(client, expected, rng, 40)
            stop = threading.Event()
            threads = [threading.Thread(target=hostile, args=(server.endpoint, n, stop)) for n in range(4)]
            for th in threads:
                th.start()
            try:
                time.sleep(0.2)  # the hostile sessions are open and starting up
                loaded = latencies(client, expected, rng, 40)
            finally:
                stop.set()
                for th in threads:
                    th.join()
            ratios.append(np.percentile(loaded, 99) / np.percentile(alone, 99))
            print(f"good robot p99 alone {np.percentile(alone, 99) * 1e3:.1f} ms, beside 4 hostile connections "
                  f"{np.percentile(loaded, 99) * 1e3:.1f} ms (x{ratios[-1]:.2f})")
            if ratios[-1] < 2:
                break
        stats = client.request_stats(2.0)
        client.close()
    print(f"server batch sizes {stats['batch']}")
    assert stats["batch"]["max"] >= 2            # the hostile start-ups really ran beside it
    assert sum(stats["errors"].values()) > 0     # and their garbage was answered
    assert min(ratios) < 2, ratios
