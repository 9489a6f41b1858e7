"""SIGKILL the server mid-episode: the robot finishes its last chunk, then holds
(zero motion, gripper kept; never a NaN or stale action), and resumes by itself
(new socket, new handshake) when a server comes back on the same address."""
from __future__ import annotations

import time

import numpy as np

from dpstack.runtime.action_schedule import ActionSchedule, Decision
from dpstack.runtime.client import ClientState, PolicyClient
from echo_server import ECHO_CHUNK, ECHO_SPEC, echo_observation
from server_process import ServerProcess

DT = 1.0 / ECHO_SPEC.control_hz
TOL = 0.01


def run_robot(client: PolicyClient, schedule: ActionSchedule, rng, seconds: float,
              until=None) -> list[tuple[float, Decision]]:
    """A 20 Hz robot loop on the monotonic clock: poll, send when idle, execute."""
    log = []
    start = time.monotonic()
    tick = start
    while time.monotonic() - start < seconds:
        now = time.monotonic()
        reply = client.poll(0.0)
        if reply is not None:
            schedule.offer(reply)
        if client.ready and not client.busy:
            client.send_observation(echo_observation(rng), now)
        log.append((now, schedule.next(now)))
        if until is not None and until(log):
            break
        tick += DT
        time.sleep(max(0.0, tick - time.monotonic()))
    return log


def check_sane(log, tolerance: float = TOL) -> None:
    for now, d in log:
        assert d.action is not None and np.isfinite(d.action).all()
        if not d.hold:
            assert d.target_time >= now - tolerance, "stale action executed"


def test_server_killed_mid_episode_robot_holds_then_resumes() -> None:
    rng = np.random.default_rng(0)
    first = ServerProcess().start()
    try:
        client = PolicyClient(first.endpoint, ECHO_SPEC, "arm", timeout_s=0.3, retry_s=0.1, heartbeat_s=0.2)
        schedule = ActionSchedule(ECHO_SPEC.action, "delta", tolerance_s=TOL)
        assert client.wait_ready(5.0)
        session = client.session_id

        before = run_robot(client, schedule, rng, 0.8)
        check_sane(before)
        assert sum(not d.hold for _, d in before) >= len(before) - 2  # served: barely any holds
        reply = client.poll(0.5)  # the answer to the observation still in flight
        if reply is not None:
            schedule.offer(reply)
        assert not client.busy
        last_seq = schedule.current_seq

        first.kill()
        during = run_robot(client, schedule, rng, 1.2)
        check_sane(during)
        acted = [d for _, d in during if not d.hold]
        # the last chunk may still be finished (at most its length), nothing newer arrives
        assert len(acted) <= ECHO_CHUNK and all(d.seq == last_seq for d in acted)
        first_hold = next(i for i, (_, d) in enumerate(during) if d.hold)
        assert all(d.hold for _, d in during[first_hold:]), "acted again after holding with no server"
        last_grip = [d for _, d in before + during[:first_hold] if not d.hold][-1].action[2]
        for _, d in during[first_hold:]:
            np.testing.assert_array_equal(d.action, [0.0, 0.0, last_grip])
        assert client.state is not ClientState.READY and client.n_reconnects >= 1

        second = ServerProcess(bind=first.endpoint).start()
        try:
            after = run_robot(client, schedule, rng, 5.0,
                              until=lambda log: sum(not d.hold for _, d in log) >= 5)
            check_sane(after)
            resumed = [d for _, d in after if not d.hold]
            assert len(resumed) >= 5, "robot did not resume after the server came back"
            assert client.ready and client.session_id != session
            assert all(d.seq > last_seq for d in resumed)
            lat = np.array(client.latencies_s)
            assert lat.size > 10 and np.isfinite(lat).all()
        finally:
            client.close()
            second.kill()
    finally:
        first.kill()
