"""One rule for stopping (dpstack/cli.py's docstring): Ctrl-C (SIGINT) exits 130 from every
command, after an orderly stop that keeps what finished; SIGTERM is how a service manager
stops `serve` and `bridge`, which then exit 0, and any other command takes it as Ctrl-C.
Real subprocesses, real signals."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dpstack.core.process import ChildProcess
from runtime_tiny_package import write_tiny_package
from server_process import REPO, ServerProcess

ENV = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}


def dpstack(*args: str, name: str = "") -> ChildProcess:
    return ChildProcess([sys.executable, "-m", "dpstack.cli", *args], name or args[0], env=ENV, cwd=REPO)


def wait_for_line(child: ChildProcess, text: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in child.lines):
        assert child.alive() and time.monotonic() < deadline, f"no {text!r}:\n{child.output}"
        time.sleep(0.05)


def stopped_by(child: ChildProcess, signum: int) -> int:
    child.proc.send_signal(signum)
    child.proc.wait(60)
    return child.stop()


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_serve(tmp_path, signum, code):
    pkg = write_tiny_package(tmp_path / "tiny")
    with dpstack("serve", str(pkg), "--bind", "tcp://127.0.0.1:*", "--sampler", "ddim-2", "--threads", "1") as child:
        child.wait_ready(60)
        assert stopped_by(child, signum) == code, child.output
        assert any(line.startswith("summary ") for line in child.lines), child.output  # still an orderly stop


@pytest.mark.slow  # starts the simulated arm process behind the bridge (~10 s)
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_bridge(tmp_path, signum, code):
    # No policy server: the bridge holds the arm; the stop is what is tested. The e-stop
    # socket on a free port, so that no other bridge on this machine is in the way.
    config = tmp_path / "robot.yaml"
    config.write_text((REPO / "deploy" / "configs" / "sim.yaml").read_text()
                      .replace("estop_endpoint: tcp://127.0.0.1:5599", "estop_endpoint: tcp://127.0.0.1:*"))
    with dpstack("bridge", "--config", str(config), "--dry-run", "--duration", "0") as child:
        wait_for_line(child, "bridge running")
        assert stopped_by(child, signum) == code, child.output
        assert any(line.startswith("summary ") for line in child.lines), child.output


@pytest.mark.slow  # robosuite's Lift and a policy server (~15 s)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sim_keeps_the_episodes_that_finished(tmp_path, signum):
    out = tmp_path / "sim.json"
    goal_server = [sys.executable, str(REPO / "tests" / "deploy_goal_server.py"), "--goal", "0.5", "0.0", "1.0"]
    with ServerProcess(command=goal_server) as server:
        with dpstack("sim", "--task", "lift", "--connect", server.endpoint, "--episodes", "1000",
                     "--max-steps", "4", "--out", str(out)) as child:
            wait_for_line(child, "episode 1 ")
            assert stopped_by(child, signum) == 130, child.output
    data = json.loads(out.read_text())
    n = len(data["episodes"])
    assert 2 <= n < 1000
    assert [e["episode"] for e in data["episodes"]] == list(range(n))
    assert data["summary"]["episodes"] == n and data["config"]["episodes"] == 1000
    assert not Path(str(out) + ".tmp").exists()


@pytest.mark.slow  # robosuite's Lift and a policy server (~15 s)
def test_sim_resume_runs_only_the_episodes_an_interrupted_run_left(tmp_path):
    out = tmp_path / "sim.json"
    goal_server = [sys.executable, str(REPO / "tests" / "deploy_goal_server.py"), "--goal", "0.5", "0.0", "1.0"]
    run = ("sim", "--task", "lift", "--episodes", "40", "--max-steps", "4", "--seed", "500", "--out", str(out))
    with ServerProcess(command=goal_server) as server:
        with dpstack(*run, "--connect", server.endpoint) as child:
            wait_for_line(child, "episode 1 ")
            assert stopped_by(child, signal.SIGINT) == 130, child.output
        kept = json.loads(out.read_text())["episodes"]
        assert 2 <= len(kept) < 40
        # Another run's file is refused, and left as it was.
        with dpstack(*run[:-4], "--seed", "501", "--out", str(out), "--resume", "--connect", server.endpoint) as child:
            assert child.proc.wait(120) == 2
            child.stop()
            assert "seed differ" in child.output, child.output
        assert json.loads(out.read_text())["episodes"] == kept
        with dpstack(*run, "--resume", "--connect", server.endpoint) as child:
            assert child.proc.wait(300) == 0, child.output
            child.stop()
            assert f"resuming after the {len(kept)} finished episodes" in child.output, child.output
            assert f"episode {len(kept) - 1} " not in child.output and f"episode {len(kept)} " in child.output
    data = json.loads(out.read_text())
    assert [(e["episode"], e["seed"]) for e in data["episodes"]] == [(i, 500 + i) for i in range(40)]
    assert data["episodes"][: len(kept)] == kept
    assert data["summary"]["episodes"] == 40
