"""Sessions on a real server subprocess: independent robots, resets, timeouts,
stats, graceful shutdown, loopback-only binds."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from dpstack.runtime.client import ClientState, PolicyClient
from dpstack.runtime.protocol import ActionReply, ErrorCode
from dpstack.runtime.server import InsecureBind, check_bind, is_loopback_endpoint
from echo_server import ECHO_SPEC, EchoPolicy, echo_observation
from server_process import ECHO_SERVER, REPO, ServerProcess


def test_two_robots_get_independent_sessions() -> None:
    with ServerProcess() as server:
        robots = {}
        for rid, seed in (("left", 1), ("right", 2)):
            client = PolicyClient(server.endpoint, ECHO_SPEC, rid, seed=seed, timeout_s=3.0)
            assert client.wait_ready(5.0)
            local = EchoPolicy()
            local.reset(seed)
            robots[rid] = (client, local, np.random.default_rng(seed))
        assert robots["left"][0].session_id != robots["right"][0].session_id
        # interleave unevenly; each robot's replies must match its own policy alone
        for step, rid in enumerate(["left", "right", "right", "left", "right", "left", "left", "right"]):
            client, local, rng = robots[rid]
            if step == 4:  # a reset on one robot must not touch the other
                client.reset(seed=5)
                local.reset(5)
            obs = echo_observation(rng)
            reply = client.request(obs, float(step), timeout_s=3.0)
            assert isinstance(reply, ActionReply)
            np.testing.assert_array_equal(reply.actions, local.act(obs).actions)
        assert robots["right"][0].episode == 1 and robots["left"][0].episode is None
        for client, _, _ in robots.values():
            client.close()


def test_observations_sent_while_busy_keep_the_history_at_control_rate() -> None:
    with ServerProcess(args=("--delay-ms", "120")) as server:  # inference slower than a 50 ms step
        client = PolicyClient(server.endpoint, ECHO_SPEC, "slow", seed=4, timeout_s=3.0)
        assert client.wait_ready(5.0)
        local = EchoPolicy()
        local.reset(4)
        rng = np.random.default_rng(4)
        asked, replies, history_only = {}, {}, 0
        for k in range(12):
            obs = echo_observation(rng)
            seq = client.send_observation(obs, k * 0.05)
            if seq is None:
                assert client.busy
                local.observe(obs)
                history_only += 1
            else:
                asked[seq] = local.act(obs).actions
            reply = client.poll(0.05)
            if reply is not None:
                replies[reply.seq] = reply.actions
        while client.busy:
            reply = client.poll(1.0)
            if reply is not None:
                replies[reply.seq] = reply.actions
        assert history_only >= 4 and len(replies) == len(asked) >= 3
        for seq, actions in replies.items():  # each chunk saw every earlier observation
            np.testing.assert_array_equal(actions, asked[seq])
        assert client.request_stats()["history_only"] == history_only
        client.close()


def first_chunk(client: PolicyClient, rng: np.random.Generator, within_s: float) -> ActionReply | None:
    """Send an observation every 50 ms control step, as a robot does, until a chunk comes."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        client.send_observation(echo_observation(rng), time.monotonic())
        reply = client.poll(0.05)
        if reply is not None:
            return reply
    return None


def test_a_slow_start_up_fits_the_start_up_budget_the_server_advertises() -> None:
    # First chunk of an episode 0.6 s, like streaming's start-up denoise; the link's timeout 0.3 s.
    with ServerProcess(args=("--startup-ms", "600", "--tell-startup")) as server:
        client = PolicyClient(server.endpoint, ECHO_SPEC, "arm", timeout_s=0.3)
        assert client.wait_ready(5.0) and client.policy.startup_s == pytest.approx(0.6)
        rng = np.random.default_rng(0)
        assert first_chunk(client, rng, 5.0) is not None and client.n_reconnects == 0
        client.reset()   # a new episode starts up again, within the same budget
        assert first_chunk(client, rng, 5.0) is not None and client.n_reconnects == 0
        client.close()


def test_an_unadvertised_slow_start_up_cannot_trap_the_client_in_a_reconnect_loop() -> None:
    # A server that does not advertise its start-up (older, or a test double): each session's
    # first chunk takes longer than the timeout, and every reconnect starts a new session.
    with ServerProcess(args=("--startup-ms", "600")) as server:
        client = PolicyClient(server.endpoint, ECHO_SPEC, "arm", timeout_s=0.2)
        assert client.wait_ready(5.0) and client.policy.startup_s is None
        assert first_chunk(client, np.random.default_rng(0), 15.0) is not None, list(client.errors)
        assert 1 <= client.n_reconnects <= 4
        client.close()


def test_idle_session_times_out_and_client_says_hello_again() -> None:
    with ServerProcess(args=("--session-timeout", "0.5")) as server:
        client = PolicyClient(server.endpoint, ECHO_SPEC, "sleepy", timeout_s=2.0, heartbeat_s=60.0)
        assert client.wait_ready(5.0)
        first = client.session_id
        rng = np.random.default_rng(0)
        assert client.request(echo_observation(rng), 0.0, 2.0) is not None
        time.sleep(1.6)  # > timeout + the server's sweep period
        assert client.request(echo_observation(rng), 1.0, 2.0) is None
        assert client.errors[-1].code == ErrorCode.NO_SESSION.value
        assert client.wait_ready(3.0) and client.session_id != first
        assert client.request(echo_observation(rng), 2.0, 2.0) is not None
        stats = client.request_stats()
        assert stats["sessions"].get("closed_timeout", 0) >= 1
        client.close()


def test_heartbeats_keep_an_idle_session_alive() -> None:
    with ServerProcess(args=("--session-timeout", "0.6")) as server:
        client = PolicyClient(server.endpoint, ECHO_SPEC, "idle", timeout_s=2.0, heartbeat_s=0.15)
        assert client.wait_ready(5.0)
        first = client.session_id
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            client.poll(0.05)
        assert client.session_id == first and client.state is ClientState.READY
        assert client.request(echo_observation(np.random.default_rng(0)), 0.0, 2.0) is not None
        assert client.session_id == first
        client.close()


def test_sigterm_closes_gracefully_with_a_summary() -> None:
    server = ServerProcess().start()
    client = PolicyClient(server.endpoint, ECHO_SPEC, "r", timeout_s=2.0)
    assert client.wait_ready(5.0)
    rng = np.random.default_rng(0)
    for k in range(5):
        assert client.request(echo_observation(rng), float(k), 2.0) is not None
    rc, out = server.stop()
    server.kill()
    assert rc == 0, out
    summary = json.loads(out.split("summary ", 1)[1].splitlines()[0])
    assert summary["chunks"] == 5 and summary["messages"]["observation"] == 5
    assert summary["compute"]["n"] == 5 and summary["queue"]["p50_ms"] >= 0
    # the server said bye: the client notices and goes back to connecting
    t_end = time.monotonic() + 1.0
    while client.state is ClientState.READY and time.monotonic() < t_end:
        client.poll(0.05)
    assert client.state is not ClientState.READY
    client.close()


@pytest.mark.parametrize("endpoint,loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("tcp://127.0.0.2:*", True), ("ipc:///tmp/dp.sock", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.10:5555", False),
    ("tcp://eth0:5555", False), ("tcp://robot-pc.local:5555", False),
])
def test_loopback_detection(endpoint: str, loopback: bool) -> None:
    assert is_loopback_endpoint(endpoint) is loopback
    if loopback:
        check_bind(endpoint)
    else:
        with pytest.raises(InsecureBind):
            check_bind(endpoint)
        check_bind(endpoint, insecure=True)
        check_bind(endpoint, authenticated=True)


def test_server_refuses_a_public_bind_without_insecure() -> None:
    p = subprocess.run([sys.executable, str(ECHO_SERVER), "--bind", "tcp://0.0.0.0:*"],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert p.returncode != 0 and "refusing to bind" in p.stderr and "--insecure" in p.stderr
    assert '"ready"' not in p.stdout


def test_curve_authenticated_server_admits_listed_robots_and_closes_cleanly(tmp_path) -> None:
    import threading

    auth = pytest.importorskip("dpstack.runtime.auth")
    from dpstack.runtime.server import PolicyServer, ServerConfig
    from echo_server import echo_info

    (tmp_path / "robots").mkdir()
    auth.generate(tmp_path, "server")
    auth.generate(tmp_path, "arm")
    auth.generate(tmp_path / "other", "stranger")
    (tmp_path / "robots" / "arm.key").write_bytes((tmp_path / "arm.key").read_bytes())
    security = auth.server_security_from_dir(tmp_path)
    server = PolicyServer(lambda spec: EchoPolicy(), ECHO_SPEC, echo_info(),
                          ServerConfig(bind="tcp://127.0.0.1:*", security=security))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set,))
    thread.start()
    try:
        listed = PolicyClient(server.endpoint, ECHO_SPEC, "arm", timeout_s=1.0,
                              security=auth.curve_client(tmp_path / "arm.key_secret", tmp_path / "server.key"))
        stranger = PolicyClient(server.endpoint, ECHO_SPEC, "stranger", timeout_s=0.5,
                                security=auth.curve_client(tmp_path / "other" / "stranger.key_secret", tmp_path / "server.key"))
        plain = PolicyClient(server.endpoint, ECHO_SPEC, "plain", timeout_s=0.5)
        assert listed.wait_ready(5.0)
        assert listed.request(echo_observation(np.random.default_rng(0)), 0.0, 2.0) is not None
        assert not stranger.wait_ready(1.0) and not plain.wait_ready(0.5)
        for c in (listed, stranger, plain):
            c.close()
    finally:
        stop.set()
        thread.join(5.0)
        t0 = time.monotonic()
        server.close()  # stops the ZAP thread first, so the context terminates
        assert time.monotonic() - t0 < 3.0
