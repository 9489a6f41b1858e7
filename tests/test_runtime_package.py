"""Loading policy packages with onnxruntime, refusing bad ones, and the PolicyRunner (no torch)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dpstack.runtime.package import PackageError, SessionOptions, load_package
from dpstack.runtime.policy import PolicyRunner
from dpstack.core.spec import ArraySpec, SpecMismatch
from runtime_tiny_package import SPEC, TA, TO, TP, write_tiny_package


@pytest.fixture()
def pkg_dir(tmp_path):
    return write_tiny_package(tmp_path / "policy")


def obs(i: float = 0.0):
    return {"pos": np.array([0.1 * i, -0.2], np.float32), "vel": np.array([1.0, 0.5 * i], np.float32)}


def test_loads_with_cpu_provider_and_thread_settings(pkg_dir):
    p = load_package(pkg_dir, serves=SPEC, options=SessionOptions(intra_op_threads=1))
    assert "CPUExecutionProvider" in p.providers
    cond = p.encode({"pos": np.zeros((3, TO, 2), np.float32), "vel": np.ones((3, TO, 2), np.float32)})
    assert cond.shape == (3, 6)
    eps = p.denoise(np.zeros((2, TP, 3), np.float32), np.zeros((2, TP), np.int64), np.zeros((2, 6), np.float32))
    assert eps.shape == (2, TP, 3)


def test_tampered_onnx_is_refused(pkg_dir):
    data = bytearray((pkg_dir / "denoiser.onnx").read_bytes())
    data[-5] ^= 0xFF
    (pkg_dir / "denoiser.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"denoiser\.onnx: sha256 .* does not match"):
        load_package(pkg_dir)


def test_missing_file_and_unknown_version_are_refused(tmp_path):
    d = write_tiny_package(tmp_path / "v9", format_version=9)
    with pytest.raises(PackageError, match="format_version 9 is not supported"):
        load_package(d)
    d = write_tiny_package(tmp_path / "gone")
    (d / "encoder.onnx").unlink()
    with pytest.raises(PackageError, match=r"encoder\.onnx: missing"):
        load_package(d)
    with pytest.raises(PackageError, match="no manifest.json"):
        load_package(tmp_path)


def test_spec_mismatch_names_the_differing_field(pkg_dir):
    other = SPEC.__class__(SPEC.task, SPEC.robot, 20.0, SPEC.observations, SPEC.action)
    with pytest.raises(SpecMismatch, match="control_hz: policy 10.0, robot 20.0"):
        load_package(pkg_dir, serves=other)
    other = SPEC.__class__(SPEC.task, SPEC.robot, 10.0, (ArraySpec("pos", (3,)), SPEC.observations[1]), SPEC.action)
    with pytest.raises(SpecMismatch, match="observation 'pos'"):
        load_package(pkg_dir, serves=other)


def test_runner_history_padding_offsets_and_units(pkg_dir):
    p = load_package(pkg_dir)
    windows = []

    def spy(window):
        windows.append({k: v.copy() for k, v in window.items()})
        return p.encode(window)

    runner = PolicyRunner(p.with_backend(spy, p.denoise), "ddim-5")
    chunk = runner.act(obs(0))
    pos0 = p.normalizer.normalize("pos", obs(0)["pos"])
    np.testing.assert_array_equal(windows[0]["pos"][0], [pos0, pos0])  # episode start repeats the first observation
    assert chunk.actions.shape == (TA, 3) and chunk.offsets.tolist() == list(range(TA))
    assert chunk.nfe == 5 and chunk.sampler == "ddim-5" and chunk.step == 0 and chunk.compute_ms > 0
    np.testing.assert_allclose(chunk.times, np.arange(TA) / 10.0)
    assert np.all(chunk.actions >= np.array(SPEC.action.low)) and np.all(chunk.actions <= np.array(SPEC.action.high))
    runner.act(obs(1))
    np.testing.assert_array_equal(windows[1]["pos"][0], [pos0, p.normalizer.normalize("pos", obs(1)["pos"])])


def test_control_step_calls_the_networks_only_when_the_chunk_is_used_up(pkg_dir):
    p = load_package(pkg_dir)
    calls = []
    runner = PolicyRunner(p.with_backend(lambda w: calls.append(1) or p.encode(w), p.denoise), "ddpm-10")
    actions = [runner.control_step(obs(i)) for i in range(2 * TA)]
    assert len(calls) == 2 and all(a.shape == (3,) for a in actions)
    runner.reset()
    assert runner.t == 0 and not runner.pending


def test_rti_replans_every_step_and_shifts_by_the_steps_that_ran(pkg_dir):
    p = load_package(pkg_dir)
    runner = PolicyRunner(p, "rti")
    seen = []
    step_gen = runner.sampler.step_gen
    runner.sampler.step_gen = lambda cond, elapsed=None: seen.append(elapsed) or step_gen(cond, elapsed)
    for i in range(3):
        runner.control_step(obs(i))  # one inference per control step, though each chunk has look-ahead
    chunk = runner.last_chunk
    assert chunk.replan_after == 1 and len(chunk.actions) == p.horizon - p.n_obs_steps + 1
    assert chunk.offsets.tolist() == list(range(len(chunk.actions)))
    runner.observe(obs(3))
    runner.observe(obs(4))  # a late robot: two steps ran from the look-ahead before it asked again
    runner.act(obs(5))
    assert seen == [None, 1, 1, 3]


def test_same_seed_same_actions_and_reset_reseeds(pkg_dir):
    p = load_package(pkg_dir)
    a, b = PolicyRunner(p, "rti-3,1,0"), PolicyRunner(p, "rti-3,1,0")
    run = lambda r: np.concatenate([r.act(obs(i)).actions for i in range(4)])  # noqa: E731
    first = run(a)
    np.testing.assert_array_equal(first, run(b))
    a.reset()
    np.testing.assert_array_equal(first, run(a))
    a.reset(seed=5)
    assert not np.allclose(first, run(a))


@pytest.mark.parametrize("bad,match", [({"pos": np.zeros(3, np.float32)}, r"pos: expected shape"),
                                       ({"vel": np.array([np.nan, 0], np.float32)}, "vel: contains NaN"),
                                       ({"vel": np.array(["a", "b"])}, "vel: expected a numeric array")])
def test_bad_observations_are_refused_with_the_key(pkg_dir, bad, match):
    runner = PolicyRunner(load_package(pkg_dir), "ddim-2")
    with pytest.raises(ValueError, match=match):
        runner.act({**obs(0), **bad})
    with pytest.raises(ValueError, match="missing 'vel'"):
        runner.act({"pos": obs(0)["pos"]})
    assert runner.t == 0  # nothing was recorded from the bad observations


def test_importing_runtime_never_imports_torch():
    code = """
import importlib, pkgutil, sys
import dpstack.runtime
names = [m.name for m in pkgutil.walk_packages(dpstack.runtime.__path__, "dpstack.runtime.")]
for n in names:
    importlib.import_module(n)
bad = sorted(m for m in ("torch", "mujoco", "robosuite") if m in sys.modules)
print(len(names), ",".join(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 8  # spec, schedule, normalizer, samplers, ladder, package, policy, cli, ...
    assert len(out) == 1, f"runtime imports {out[1]}"
