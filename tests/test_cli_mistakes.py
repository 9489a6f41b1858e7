"""Ordinary mistakes get one sentence and a non-zero exit, never a traceback: each
command runs as a real `python -m dpstack.cli` subprocess, as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from runtime_tiny_package import write_tiny_package


def dpstack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dpstack.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_sentence(result: subprocess.CompletedProcess) -> str:
    """The refusal: a non-zero exit and one line on stderr, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture()
def busy_port():
    """A loopback TCP port some other process (here: this test) has bound."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    yield sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(0)
    ctx.term()


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return write_tiny_package(tmp_path / "tiny")


def test_serve_on_a_port_in_use(tiny, busy_port):
    line = one_sentence(dpstack("serve", str(tiny), "--bind", busy_port, "--sampler", "ddim-2"))
    assert line.startswith("dpstack serve:") and busy_port in line and "already in use" in line


def test_serve_on_a_bind_without_a_scheme(tiny):
    line = one_sentence(dpstack("serve", str(tiny), "--bind", "5602", "--sampler", "ddim-2"))
    assert "no scheme" in line and "tcp://127.0.0.1:5602" in line


def test_sim_with_an_unknown_task_lists_the_known_ones():
    line = one_sentence(dpstack("sim", "--task", "nope", "--connect", "tcp://127.0.0.1:1"))
    assert "'nope'" in line and "lift" in line and "stack" in line


def test_sim_with_a_connect_endpoint_without_a_scheme():
    line = one_sentence(dpstack("sim", "--connect", "5602"))
    assert "tcp://127.0.0.1:5602" in line


def test_eval_with_an_unknown_task_refuses_before_serving(tiny, tmp_path):
    line = one_sentence(dpstack("eval", str(tiny), "--task", "nope", "--samplers", "ddim-2",
                                "--episodes", "1", "--out", str(tmp_path / "eval")))
    assert "'nope'" in line and "lift" in line
    assert not (tmp_path / "eval" / "logs").exists()  # no server was started


def test_eval_with_an_unknown_sampler_refuses_before_serving(tiny, tmp_path):
    line = one_sentence(dpstack("eval", str(tiny), "--samplers", "ddim,foo", "--episodes", "1",
                                "--out", str(tmp_path / "eval")))
    assert "'foo'" in line and "ddim-N" in line
    assert not (tmp_path / "eval" / "logs").exists()


def test_estop_client_with_no_bridge_says_the_command_was_not_delivered(busy_port):
    # busy_port is a ROUTER that never answers: as good as no bridge at all
    result = subprocess.run([sys.executable, "-m", "dpstack.deploy.estop", busy_port, "estop"],
                            capture_output=True, text=True, timeout=60)
    line = one_sentence(result)
    assert busy_port in line and "NOT" in line and "bridge" in line


def test_estop_client_with_an_endpoint_without_a_scheme():
    result = subprocess.run([sys.executable, "-m", "dpstack.deploy.estop", "5599", "status"],
                            capture_output=True, text=True, timeout=60)
    assert "tcp://127.0.0.1:5599" in one_sentence(result)


@pytest.mark.parametrize("content", [b"hello\n", b"\x80\x04}q\x00."])  # text, and a plain pickle
def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "notes.pt"
    bad.write_bytes(content)
    line = one_sentence(dpstack("export", str(bad), "--out", str(tmp_path / "pkg")))
    assert str(bad) in line and "not a dpstack checkpoint" in line and "dpstack train" in line
    assert "weights_only" not in line
    assert not (tmp_path / "pkg").exists()


@pytest.mark.slow  # starts the simulated arm process behind the bridge (~10 s)
def test_bridge_with_its_estop_port_in_use(busy_port, tmp_path):
    config = tmp_path / "robot.yaml"
    text = (Path(__file__).resolve().parents[1] / "deploy" / "configs" / "sim.yaml").read_text()
    config.write_text(text.replace("estop_endpoint: tcp://127.0.0.1:5599", f"estop_endpoint: {busy_port}"))
    result = dpstack("bridge", "--config", str(config), "--dry-run", "--duration", "5")
    line = one_sentence(result)
    assert "estop_endpoint" in line and busy_port in line and "already in use" in line


@pytest.mark.parametrize("args,named", [(("--samplers", "ddim,foo"), "'foo'"), (("--task", "nope"), "'nope'")])
def test_demo_refuses_an_unknown_sampler_or_task_before_collecting(tmp_path, args, named):
    line = one_sentence(dpstack("demo", "--quick", "--out", str(tmp_path / "demo"), *args))
    assert named in line
    assert not (tmp_path / "demo").exists()


def test_bridge_with_a_policy_endpoint_without_a_scheme():
    line = one_sentence(dpstack("bridge", "--config", "sim", "--dry-run", "--endpoint", "5555"))
    assert "tcp://127.0.0.1:5555" in line
