"""robomimic HDF5 import on a small file written with h5py."""
import h5py
import numpy as np
import pytest

from dpstack.data.replay_buffer import DatasetError, ReplayBuffer
from dpstack.data.robomimic import absolute_to_stored, axis_angle_to_rotation_6d, convert_robomimic, declares_absolute

from _data_helpers import ENV_ARGS, LENGTHS, write_robomimic


def test_import_keeps_numeric_order_keys_and_attrs(tmp_path):
    src = tmp_path / "lift_ph.hdf5"
    demos = write_robomimic(src)
    convert_robomimic(src, tmp_path / "lift.zarr", progress=False)
    rb = ReplayBuffer.open(tmp_path / "lift.zarr")
    order = ["demo_0", "demo_1", "demo_2", "demo_10"]  # demo_2 before demo_10
    assert rb.n_episodes == 4
    assert rb.episode_lengths().tolist() == [LENGTHS[n] for n in order]
    # robomimic's "object" is robosuite's "object-state", the name our tasks and shipped configs use.
    assert set(rb.keys) == {"robot0_eef_pos", "object-state", "agentview_image", "action", "reward", "done"}
    for i, name in enumerate(order):
        ep = rb.get_episode(i)
        np.testing.assert_allclose(ep["robot0_eef_pos"], demos[name]["robot0_eef_pos"], rtol=1e-6)
        np.testing.assert_array_equal(ep["agentview_image"], demos[name]["agentview_image"])
        np.testing.assert_allclose(ep["action"], demos[name]["action"], rtol=1e-6)
        assert ep["done"].tolist() == [0] * (LENGTHS[name] - 1) + [1]
    assert rb.dtype("robot0_eef_pos") == np.float32 and rb.dtype("agentview_image") == np.uint8
    a = rb.attrs
    assert a.task == "Lift" and a.control_hz == 20.0 and a.source == "import"
    assert a.spec.robot == "Panda"
    assert a.spec.action.gripper_dims == (6,) and a.spec.action.low == (-1.0,) * 7
    assert a.spec.obs("agentview_image").shape == (16, 16, 3)
    assert a.extra["demos"] == order and a.extra["env_args"]["env_name"] == "Lift"
    assert a.extra["actions"]["space"] == "delta"


def test_import_subset_of_obs_keys_and_overrides(tmp_path):
    src = tmp_path / "x.hdf5"
    write_robomimic(src, env_args={"env_name": "PickPlaceCan", "env_kwargs": {"robots": "Panda"}})
    with pytest.raises(DatasetError, match="control_freq"):
        convert_robomimic(src, tmp_path / "a.zarr", progress=False)
    rb = convert_robomimic(src, tmp_path / "b.zarr", obs_keys=["object"], task="can", control_hz=10,
                           gripper_dims=[], progress=False)
    assert rb.attrs.spec.obs_keys == ("object-state",) and rb.attrs.task == "can" and rb.attrs.control_hz == 10
    assert rb.attrs.spec.action.gripper_dims == ()
    assert set(rb.keys) == {"object-state", "action", "reward", "done"}


def test_import_renames_keys_and_sets_the_robot(tmp_path):
    src = tmp_path / "x.hdf5"
    demos = write_robomimic(src)
    rb = convert_robomimic(src, tmp_path / "a.zarr", obs_keys=["object-state", "robot0_eef_pos"],
                           rename={"robot0_eef_pos": "eef"}, robot="UR5e", progress=False)
    assert rb.attrs.spec.obs_keys == ("object-state", "eef") and rb.attrs.spec.robot == "UR5e"
    np.testing.assert_allclose(rb.get_episode(0)["eef"], demos["demo_0"]["robot0_eef_pos"], rtol=1e-6)
    # The default rename can be undone.
    rb = convert_robomimic(src, tmp_path / "b.zarr", obs_keys=["object"], rename={"object": "object"}, progress=False)
    assert rb.attrs.spec.obs_keys == ("object",)
    with pytest.raises(DatasetError, match=r"--rename nope=x: the file has no observation 'nope'"):
        convert_robomimic(src, tmp_path / "c.zarr", rename={"nope": "x"}, progress=False)
    with pytest.raises(DatasetError, match="reserved"):
        convert_robomimic(src, tmp_path / "d.zarr", rename={"robot0_eef_pos": "action"}, progress=False)
    with pytest.raises(DatasetError, match="two observations"):
        convert_robomimic(src, tmp_path / "e.zarr", rename={"robot0_eef_pos": "object-state"}, progress=False)


def test_import_errors_name_the_problem(tmp_path):
    src = tmp_path / "x.hdf5"
    write_robomimic(src)
    with pytest.raises(DatasetError, match=r"data/demo_0/obs/wrist_image: missing"):
        convert_robomimic(src, tmp_path / "a.zarr", obs_keys=["wrist_image"], progress=False)
    bad = tmp_path / "bad.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_group("stuff")
    with pytest.raises(DatasetError, match="missing group 'data'"):
        convert_robomimic(bad, tmp_path / "b.zarr", progress=False)
    with pytest.raises(FileNotFoundError):
        convert_robomimic(tmp_path / "nope.hdf5", tmp_path / "c.zarr", progress=False)
    nameless = tmp_path / "nameless.hdf5"
    write_robomimic(nameless, env_args={"env_kwargs": {"control_freq": 20}})
    with pytest.raises(DatasetError, match=r"--task"):
        convert_robomimic(nameless, tmp_path / "d.zarr", progress=False)


def add_absolute_actions(path, key):
    """Absolute actions (position, axis-angle, the delta file's gripper) under `key` in every demo."""
    rng = np.random.default_rng(1)
    out = {}
    with h5py.File(path, "r+") as f:
        for name, demo in f["data"].items():
            T = demo["actions"].shape[0]
            axis = rng.normal(size=(T, 3))
            axis /= np.linalg.norm(axis, axis=1, keepdims=True)
            rotvec = axis * rng.uniform(0.1, 3.0, size=(T, 1))
            acts = np.concatenate([rng.normal(size=(T, 3)), rotvec, demo["actions"][:, 6:]], axis=1)
            if key in demo:
                del demo[key]
            demo.create_dataset(key, data=acts)
            out[name] = acts
    return out


def matrix_from_rotation_6d(r6):
    """Gram-Schmidt on the two stored rows, as Diffusion Policy's rotation_6d_to_matrix does."""
    b1 = r6[..., :3] / np.linalg.norm(r6[..., :3], axis=-1, keepdims=True)
    b2 = r6[..., 3:] - (b1 * r6[..., 3:]).sum(-1, keepdims=True) * b1
    b2 /= np.linalg.norm(b2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], axis=-2)


def test_rotation_6d_is_the_first_two_rows_of_the_matrix():
    # A quarter turn about z: rows (0, -1, 0) and (1, 0, 0).
    np.testing.assert_allclose(axis_angle_to_rotation_6d(np.array([0, 0, np.pi / 2])), [0, -1, 0, 1, 0, 0], atol=1e-12)
    two_arms = np.concatenate([np.ones((2, 3)), np.zeros((2, 3)), -np.ones((2, 1))] * 2, axis=1)
    out = absolute_to_stored(two_arms)
    assert out.shape == (2, 20)
    np.testing.assert_array_equal(out[0], [1, 1, 1, 1, 0, 0, 0, 1, 0, -1] * 2)   # zero rotation = identity rows


def test_controller_configs_declare_absolute_actions():
    assert not declares_absolute(ENV_ARGS)
    assert declares_absolute({"env_kwargs": {"controller_configs": {"type": "OSC_POSE", "control_delta": False}}})
    assert declares_absolute({"env_kwargs": {"controller_configs": {   # robosuite 1.5 composite config
        "type": "BASIC", "body_parts": {"right": {"type": "OSC_POSE", "input_type": "absolute"}}}}})


def test_import_absolute_actions_as_rotation_6d(tmp_path):
    src = tmp_path / "lift.hdf5"
    env_args = {**ENV_ARGS, "env_kwargs": {**ENV_ARGS["env_kwargs"],
                                           "controller_configs": {"type": "OSC_POSE", "control_delta": False}}}
    demos = write_robomimic(src, env_args=env_args)
    absolute = add_absolute_actions(src, "actions_abs")
    rb = convert_robomimic(src, tmp_path / "abs.zarr", progress=False)
    a = rb.attrs.spec.action
    assert a.shape == (10,) and a.gripper_dims == (9,) and a.low == () and a.names[3:9] == tuple(
        f"rot6d_{i}" for i in range(6))
    assert rb.attrs.extra["actions"] == {"space": "absolute", "from": "actions_abs (env_args: absolute controller)",
                                         "rotation": "rotation_6d", "source_rotation": "axis_angle"}
    for i, name in enumerate(["demo_0", "demo_1", "demo_2", "demo_10"]):
        got, want = rb.get_episode(i)["action"], absolute[name]
        np.testing.assert_allclose(got[:, :3], want[:, :3], rtol=1e-6)
        np.testing.assert_array_equal(got[:, 9], demos[name]["action"][:, 6])
        # The stored rotation turns about the recorded axis by the recorded angle.
        R = matrix_from_rotation_6d(got[:, 3:9].astype(np.float64))
        angle = np.linalg.norm(want[:, 3:6], axis=1)
        axis = want[:, 3:6] / angle[:, None]
        np.testing.assert_allclose(np.einsum("tij,tj->ti", R, axis), axis, atol=1e-5)
        np.testing.assert_allclose(np.trace(R, axis1=1, axis2=2), 1 + 2 * np.cos(angle), atol=1e-5)
    # --actions delta still takes the delta actions from the same file.
    rb = convert_robomimic(src, tmp_path / "delta.zarr", progress=False, actions="delta")
    assert rb.attrs.spec.action.shape == (7,) and rb.attrs.extra["actions"]["space"] == "delta"


def test_diffusion_policy_abs_file_is_detected_by_name(tmp_path, capsys):
    from dpstack.cli import main

    src = tmp_path / "low_dim_abs.hdf5"      # DP's converted files: absolute `actions`, delta env_args
    write_robomimic(src)
    absolute = add_absolute_actions(src, "actions")
    assert main(["data", "convert", str(src), "--out", str(tmp_path / "a.zarr")]) == 0
    assert "absolute actions (10,)" in capsys.readouterr().out
    rb = ReplayBuffer.open(tmp_path / "a.zarr")
    assert rb.attrs.extra["actions"]["from"] == "actions (file name *_abs.hdf5)"
    np.testing.assert_allclose(rb.get_episode(0)["action"][:, :3], absolute["demo_0"][:, :3], rtol=1e-6)
    plain = tmp_path / "plain.hdf5"
    write_robomimic(plain)
    with h5py.File(plain, "r+") as f:                  # 8 dims cannot be position + axis-angle + gripper
        for demo in f["data"].values():
            acts = demo["actions"][:]
            del demo["actions"]
            demo.create_dataset("actions", data=np.concatenate([acts, acts[:, :1]], axis=1))
    assert main(["data", "convert", str(plain), "--out", str(tmp_path / "b.zarr"), "--actions", "absolute"]) == 2
    err = capsys.readouterr().err
    assert "got 8 dims" in err and "--actions delta" in err and "Traceback" not in err


def _upright_frames(T, h=8, w=6):
    """Frames whose top row is red and bottom row blue, so the top is known."""
    img = np.zeros((T, h, w, 3), dtype=np.uint8)
    img[:, 0, :, 0] = 255
    img[:, -1, :, 2] = 255
    img[:, 1:-1] = np.arange(1, h - 1, dtype=np.uint8)[None, :, None, None] * 20
    return img


def _with_frames(path, frames, convention=None):
    write_robomimic(path)
    with h5py.File(path, "r+") as f:
        if convention is not None:
            f["data"].attrs["macros_image_convention"] = convention
        for name in f["data"]:
            T = f["data"][name]["actions"].shape[0]
            del f["data"][name]["obs"]["agentview_image"]
            f["data"][name]["obs"].create_dataset("agentview_image", data=frames(T))


@pytest.mark.parametrize("declared, in_file, flag", [
    (None, "upright", "auto"),        # robomimic's own files: its EnvRobosuite wrote them upright
    ("opencv", "upright", "auto"),
    ("opengl", "bottom-up", "auto"),  # LIBERO-style: as robosuite rendered them
    (None, "bottom-up", "opengl"),    # undeclared, named on the command line
    ("opengl", "upright", "opencv"),  # the flag overrides the attribute
])
def test_import_stores_frames_upright(tmp_path, declared, in_file, flag):
    src = tmp_path / "img.hdf5"
    frames = _upright_frames if in_file == "upright" else (lambda T: _upright_frames(T)[:, ::-1])
    _with_frames(src, frames, declared)
    rb = convert_robomimic(src, tmp_path / "out.zarr", progress=False, image_convention=flag)
    for i in range(rb.n_episodes):
        img = rb.get_episode(i)["agentview_image"]
        np.testing.assert_array_equal(img, _upright_frames(img.shape[0]))
    images = rb.attrs.extra["images"]
    assert images["flipped"] == (in_file == "bottom-up")
    assert images["convention_in_file"] == ("opencv" if in_file == "upright" else "opengl")


def test_import_refuses_an_unknown_image_convention_attribute(tmp_path):
    src = tmp_path / "img.hdf5"
    _with_frames(src, _upright_frames, "directx")
    with pytest.raises(DatasetError, match="macros_image_convention.*--image-convention"):
        convert_robomimic(src, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists()
