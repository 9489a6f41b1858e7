"""robomimic HDF5 import on a small file written with h5py."""
import h5py
import numpy as np
import pytest

from dpstack.data.replay_buffer import DatasetError, ReplayBuffer
from dpstack.data.robomimic import convert_robomimic

from _data_helpers import LENGTHS, write_robomimic


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
