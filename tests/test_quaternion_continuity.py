"""Quaternion observations are sign-continuous within an episode (q and -q: one rotation, two inputs)."""
import numpy as np
import pytest

from dpstack.core.quaternion import (continue_episode, continue_sign, count_sign_flips, quaternion_layout,
                                     quaternion_slices)
from dpstack.core.spec import ArraySpec

OBJECT = ArraySpec("object-state", (10,), names=("Nut_pos[0]", "Nut_pos[1]", "Nut_pos[2]",
                                                 *(f"Nut_quat[{i}]" for i in range(4)),
                                                 "Nut_to_eef_pos[0]", "Nut_to_eef_pos[1]", "Nut_to_eef_pos[2]"))


def _yaw_quats(yaws: np.ndarray) -> np.ndarray:
    return np.stack([np.zeros_like(yaws), np.zeros_like(yaws), np.sin(yaws / 2), np.cos(yaws / 2)], axis=1)


def test_slices_come_from_the_observation_names():
    assert quaternion_slices(OBJECT) == (slice(3, 7),)
    assert quaternion_slices(ArraySpec("robot0_eef_quat", (4,), names=("qx", "qy", "qz", "qw"))) == (slice(0, 4),)
    assert quaternion_slices(ArraySpec("robot0_eef_pos", (3,))) == ()
    assert quaternion_slices(ArraySpec("object-state", (10,))) == ()  # no names, no guessing
    assert quaternion_layout([OBJECT, ArraySpec("robot0_eef_pos", (3,))]) == {"object-state": (slice(3, 7),)}


def test_a_flipped_sequence_becomes_continuous_and_keeps_its_rotations():
    q = _yaw_quats(np.linspace(-0.5, 3.0, 50))
    flipped = q * np.where(np.arange(50) % 7 == 3, -1.0, 1.0)[:, None]
    assert count_sign_flips(flipped) > 0
    out = continue_sign(flipped)
    assert count_sign_flips(out) == 0
    assert np.allclose(np.abs((out * flipped).sum(axis=1)), 1.0)  # same rotations
    assert np.allclose(out, q)  # q starts with w as its largest component, already canonical


def test_first_step_is_canonical_and_zeros_stay_zero():
    q = np.array([[0.0, 0.0, 0.0, 0.0], [-0.9, 0.1, 0.0, -0.1], [0.9, -0.1, 0.0, 0.1]])
    out = continue_sign(q)
    assert np.allclose(out, [[0, 0, 0, 0], [0.9, -0.1, 0.0, 0.1], [0.9, -0.1, 0.0, 0.1]])
    # The stream form gives the same answer as the whole-episode form.
    assert np.allclose(continue_sign(q[2:], out[1]), out[2:])


def test_an_episode_is_continued_only_in_its_quaternion_slices():
    T = 20
    obj = np.random.default_rng(0).normal(size=(T, 10)).astype(np.float32)
    obj[:, 3:7] = _yaw_quats(np.linspace(0, 1, T)) * np.where(np.arange(T) % 2, -1.0, 1.0)[:, None]
    out = continue_episode({"object-state": obj, "action": obj[:, :7]}, quaternion_layout([OBJECT]))
    assert count_sign_flips(out["object-state"][:, 3:7]) == 0
    assert np.array_equal(out["object-state"][:, [0, 1, 2, 7, 8, 9]], obj[:, [0, 1, 2, 7, 8, 9]])
    assert out["action"] is obj[:, :7] or np.array_equal(out["action"], obj[:, :7])
    assert count_sign_flips(obj[:, 3:7]) > 0  # the input was not touched


@pytest.mark.slow
def test_sim_env_observations_have_no_quaternion_sign_flips():
    pytest.importorskip("robosuite")
    from dpstack.sim.env import SimEnv
    from dpstack.sim.experts import run_expert_episode

    env = SimEnv("square", seed=None)
    try:
        layout = quaternion_layout(env.spec.observations)
        assert set(layout) == {"robot0_eef_quat", "object-state"} and len(layout["object-state"]) == 2
        ep = run_expert_episode(env, 0)
    finally:
        env.close()
    flips = {(k, sl.start): count_sign_flips(ep.steps[k][:, sl]) for k, sls in layout.items() for sl in sls}
    assert flips == {k: 0 for k in flips}, flips


def _store_with_flips(path, n=3, T=30):
    from dpstack.core.spec import ActionSpec, RobotSpec
    from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer

    spec = RobotSpec("square", "Panda", 20.0, (OBJECT,), ActionSpec(shape=(2,)))
    rb = ReplayBuffer.create(path, DatasetAttrs("square", 20.0, spec, "scripted_expert"))
    rng = np.random.default_rng(1)
    for e in range(n):
        obj = rng.normal(size=(T, 10)).astype(np.float32)
        obj[:, 3:7] = _yaw_quats(np.linspace(0, 2, T)) * np.where(np.arange(T) % (3 + e) == 1, -1.0, 1.0)[:, None]
        rb.add_episode({"object-state": obj, "action": np.full((T, 2), e, np.float32)})
    rb.close()
    return path


def test_data_edit_makes_a_stored_dataset_continuous_in_place(tmp_path, capsys):
    from dpstack.cli import main
    from dpstack.data.replay_buffer import ReplayBuffer

    src = _store_with_flips(tmp_path / "sq.zarr")
    with ReplayBuffer.open(src) as rb:
        old = [rb.get_episode(i) for i in range(rb.n_episodes)]
    assert sum(count_sign_flips(ep["object-state"][:, 3:7]) for ep in old) > 0
    assert main(["data", "edit", str(src), "--in-place", "--continuous-quaternions"]) == 0
    out = capsys.readouterr().out
    assert "quaternion sign flips:" in out and "after" in out and ", 0 after" in out
    with ReplayBuffer.open(src) as rb:
        new = [rb.get_episode(i) for i in range(rb.n_episodes)]
        assert rb.attrs.extra["quaternions"] == "sign-continuous"
    assert len(new) == len(old)
    for a, b in zip(old, new):
        assert count_sign_flips(b["object-state"][:, 3:7]) == 0
        assert np.allclose(np.abs((a["object-state"][:, 3:7] * b["object-state"][:, 3:7]).sum(1)), 1.0, atol=1e-5)
        assert np.array_equal(a["object-state"][:, [0, 1, 2, 7, 8, 9]], b["object-state"][:, [0, 1, 2, 7, 8, 9]])
        assert np.array_equal(a["action"], b["action"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sq.zarr"]  # no staging left behind


def test_data_edit_refuses_a_store_that_names_no_quaternions(tmp_path, capsys):
    from dpstack.cli import main
    from dpstack.core.spec import ActionSpec, RobotSpec
    from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer

    spec = RobotSpec("lift", "Panda", 20.0, (ArraySpec("pos", (3,)),), ActionSpec(shape=(2,)))
    rb = ReplayBuffer.create(tmp_path / "a.zarr", DatasetAttrs("lift", 20.0, spec, "scripted_expert"))
    rb.add_episode({"pos": np.zeros((4, 3), np.float32), "action": np.zeros((4, 2), np.float32)})
    rb.close()
    assert main(["data", "edit", str(tmp_path / "a.zarr"), "--out", str(tmp_path / "b.zarr"),
                 "--continuous-quaternions"]) == 2
    err = capsys.readouterr().err
    assert "names no quaternion observations" in err and "Traceback" not in err
    assert not (tmp_path / "b.zarr").exists()


def _write_can_file(path, T=25):
    import h5py, json
    rng = np.random.default_rng(3)
    env_args = {"env_name": "PickPlaceCan", "type": 1, "env_kwargs": {"robots": ["Panda"], "control_freq": 20}}
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(env_args)
        for d in range(2):
            sign = np.where(np.arange(T) % (4 + d) == 2, -1.0, 1.0)[:, None]
            obj = rng.normal(size=(T, 14))
            obj[:, 3:7] = _yaw_quats(np.linspace(0, 1, T)) * sign
            obj[:, 10:14] = _yaw_quats(np.linspace(1, 3, T)) * sign
            obj[0, 10:14] = 0  # robosuite reports the relative pose as zeros on the first step
            g = data.create_group(f"demo_{d}")
            g.create_dataset("obs/object", data=obj)
            g.create_dataset("obs/robot0_eef_pos", data=rng.normal(size=(T, 3)))
            g.create_dataset("actions", data=rng.uniform(-1, 1, size=(T, 7)))
            demos[d] = obj
    return demos


def test_robomimic_import_names_the_object_dims_and_continues_its_quaternions(tmp_path):
    from dpstack.data.robomimic import convert_robomimic

    demos = _write_can_file(tmp_path / "can.hdf5")
    rb = convert_robomimic(tmp_path / "can.hdf5", tmp_path / "can.zarr", progress=False)
    try:
        spec = rb.attrs.spec.obs("object-state")
        assert spec.names[3:7] == tuple(f"Can_quat[{i}]" for i in range(4))
        assert quaternion_slices(spec) == (slice(3, 7), slice(10, 14))
        for d, raw in demos.items():
            got = rb.get_episode(d)["object-state"]
            assert count_sign_flips(raw[:, 3:7]) > 0 and count_sign_flips(raw[:, 10:14]) > 0
            assert count_sign_flips(got[:, 3:7]) == 0 and count_sign_flips(got[:, 10:14]) == 0
            assert np.allclose(got[:, [0, 1, 2, 7, 8, 9]], raw[:, [0, 1, 2, 7, 8, 9]])
            assert np.allclose(np.abs((got[:, 3:7] * raw[:, 3:7]).sum(1)), 1.0, atol=1e-5)
    finally:
        rb.close()


def test_robomimic_import_leaves_an_object_vector_that_does_not_fit_the_known_layout(tmp_path):
    from _data_helpers import write_robomimic
    from dpstack.data.robomimic import convert_robomimic

    demos = write_robomimic(tmp_path / "lift.hdf5")  # Lift's 10 dims, but random values: no unit quaternion
    rb = convert_robomimic(tmp_path / "lift.hdf5", tmp_path / "lift.zarr", progress=False)
    try:
        assert rb.attrs.spec.obs("object-state").names == ()
        assert np.allclose(rb.get_episode(0)["object-state"], demos["demo_0"]["object"])
    finally:
        rb.close()
