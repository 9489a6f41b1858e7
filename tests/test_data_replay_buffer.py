"""ReplayBuffer on real zarr stores: round trip, Diffusion Policy stores written
with zarr's format-2 API (directory and .zarr.zip), and corrupt datasets."""
import json
import shutil
import zipfile

import numpy as np
import pytest
import zarr

from dpstack.data.replay_buffer import DatasetAttrs, DatasetError, PartialEpisodeWarning, ReplayBuffer
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

from _data_helpers import build_dp_store


def make_attrs(hz=20.0):
    spec = RobotSpec("lift", "Panda", hz,
                     (ArraySpec("robot0_eef_pos", (3,), names=("x", "y", "z")),
                      ArraySpec("agentview_image", (8, 10, 3), "uint8")),
                     ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))
    return DatasetAttrs("lift", hz, spec, "scripted_expert", extra={"seed": 3})


def make_episode(T, seed):
    rng = np.random.default_rng(seed)
    return {"robot0_eef_pos": rng.normal(size=(T, 3)).astype(np.float32),
            "agentview_image": rng.integers(0, 255, size=(T, 8, 10, 3), dtype=np.uint8),
            "action": rng.uniform(-1, 1, size=(T, 7)).astype(np.float32),
            "reward": rng.random(T).astype(np.float32)}


def test_round_trip(tmp_path):
    path = tmp_path / "demo.zarr"
    lengths = [5, 17, 1, 40]
    eps = [make_episode(T, i) for i, T in enumerate(lengths)]
    rb = ReplayBuffer.create(path, make_attrs())
    for ep in eps:
        rb.add_episode(ep)
    assert rb.n_episodes == 4

    rb = ReplayBuffer.open(path)
    assert rb.n_episodes == 4 and rb.n_steps == sum(lengths)
    assert rb.episode_ends.dtype == np.int64 and rb.episode_ends.tolist() == np.cumsum(lengths).tolist()
    assert set(rb.keys) == {"robot0_eef_pos", "agentview_image", "action", "reward"}
    assert rb.attrs == make_attrs()
    for i, ep in enumerate(eps):
        got = rb.get_episode(i)
        for k in ep:
            np.testing.assert_array_equal(got[k], ep[k])
            assert got[k].dtype == ep[k].dtype
    loaded = rb.load(["action"])
    np.testing.assert_array_equal(loaded["action"], np.concatenate([e["action"] for e in eps]))
    with pytest.raises(DatasetError, match="read-only"):
        rb.add_episode(eps[0])


def test_written_layout_is_plain_zarr_v2_diffusion_policy_layout(tmp_path):
    path = tmp_path / "demo.zarr"
    rb = ReplayBuffer.create(path, make_attrs())
    rb.add_episode(make_episode(6, 0))
    rb.add_episode(make_episode(4, 1))
    # What Diffusion Policy's own code looks at, read with plain zarr.
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    root = zarr.open_group(str(path), mode="r")
    assert root["meta/episode_ends"][:].tolist() == [6, 10]
    assert root["meta/episode_ends"].dtype == np.int64
    assert root["data/action"].shape == (10, 7)
    assert root["data/agentview_image"].shape == (10, 8, 10, 3)
    assert root.attrs["task"] == "lift" and root.attrs["spec"]["action"]["gripper_dims"] == [6]


@pytest.mark.parametrize("kind", ["directory", "zip_of_directory", "zarr_zipstore"])
def test_reads_diffusion_policy_format2_store(tmp_path, kind):
    lengths = [9, 12, 4]
    if kind == "zarr_zipstore":
        path = tmp_path / "pusht.zarr.zip"
        store = zarr.storage.ZipStore(path, mode="w")
        arrays = build_dp_store(store, lengths)
        store.close()
    else:
        d = tmp_path / "pusht.zarr"
        arrays = build_dp_store(str(d), lengths)
        path = d
        if kind == "zip_of_directory":  # how zarr 2's ZipStore lays files out: keys at the archive root
            path = tmp_path / "pusht2.zarr.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
                for f in sorted(d.rglob("*")):
                    if f.is_file():
                        zf.write(f, f.relative_to(d).as_posix())
    with ReplayBuffer.open(path) as rb:
        assert rb.attrs is None
        assert rb.n_episodes == 3 and rb.n_steps == 25 and rb.keys == ("action", "img", "state")
        ep = rb.get_episode(1)
        for k, v in arrays.items():
            np.testing.assert_array_equal(ep[k], v[9:21])
        np.testing.assert_array_equal(rb.load()["img"], arrays["img"])
        assert rb.shape("img") == (6, 6, 3) and rb.dtype("img") == np.uint8
    if kind != "directory":
        with pytest.raises(DatasetError, match="read-only"):
            ReplayBuffer.open(path, mode="a")


def test_append_to_foreign_store_keeps_its_layout(tmp_path):
    path = tmp_path / "foreign.zarr"
    arrays = build_dp_store(str(path), [9, 12, 4])  # compressed episode_ends, chunks of 2
    rb = ReplayBuffer.open(path, mode="a")
    new = {"state": np.ones((3, 5), np.float32), "action": np.zeros((3, 2), np.float32),
           "img": np.full((3, 6, 6, 3), 9, np.uint8)}
    rb.add_episode(new)
    spec = RobotSpec("pusht", "sim", 10.0, (ArraySpec("state", (5,)),), ActionSpec(shape=(2,)))
    rb.set_attrs(DatasetAttrs("pusht", 10.0, spec, "import"))
    root = zarr.open_group(str(path), mode="r")
    assert root["meta/episode_ends"][:].tolist() == [9, 21, 25, 28]
    np.testing.assert_array_equal(root["data/state"][:25], arrays["state"])
    rb = ReplayBuffer.open(path)
    assert rb.attrs.task == "pusht" and rb.n_episodes == 4
    np.testing.assert_array_equal(rb.get_episode(3)["img"], new["img"])


# ---------------------------------------------------------------- bad datasets
def _good(tmp_path):
    path = tmp_path / "d.zarr"
    rb = ReplayBuffer.create(path, make_attrs())
    rb.add_episode(make_episode(10, 0))
    rb.add_episode(make_episode(8, 1))
    return path


def _rewrite_episode_ends(path, values, dtype=np.int64):
    meta = zarr.open_group(str(path / "meta"), mode="r+", zarr_format=2)
    del meta["episode_ends"]
    a = meta.create_array(name="episode_ends", shape=(len(values),), dtype=dtype, compressors=None)
    a[:] = np.asarray(values, dtype=dtype)


@pytest.mark.parametrize("breakage, message", [
    ("missing_ends", "missing meta/episode_ends"),
    ("not_monotonic", r"meta/episode_ends: not strictly increasing at index 1"),
    ("float_ends", r"meta/episode_ends: expected a 1-D integer array"),
    ("too_long_ends", r"data/\w+: has 18 rows but meta/episode_ends\[-1\] is 30"),
    ("spec_shape", r"attrs spec: key 'robot0_eef_pos' has per-step shape \(3,\), spec says \(4,\)"),
    ("spec_missing_key", r"attrs spec: key 'wrist_image' is in the spec but not in the data"),
    ("attrs_missing_field", r"dataset attrs: missing field 'control_hz'"),
    ("no_data_group", r"missing group 'data'"),
])
def test_corrupt_dataset_error_names_the_problem(tmp_path, breakage, message):
    path = _good(tmp_path)
    if breakage == "missing_ends":
        shutil.rmtree(path / "meta" / "episode_ends")
    elif breakage == "not_monotonic":
        _rewrite_episode_ends(path, [10, 5])
    elif breakage == "float_ends":
        _rewrite_episode_ends(path, [10.0, 18.0], np.float64)
    elif breakage == "too_long_ends":
        _rewrite_episode_ends(path, [10, 30])
    elif breakage.startswith("spec") or breakage.startswith("attrs"):
        attrs = json.loads((path / ".zattrs").read_text())
        if breakage == "spec_shape":
            attrs["spec"]["observations"][0]["shape"] = [4]
            attrs["spec"]["observations"][0]["names"] = []
        elif breakage == "spec_missing_key":
            attrs["spec"]["observations"].append({"key": "wrist_image", "shape": [8, 8, 3], "dtype": "uint8"})
        else:
            del attrs["control_hz"]
        (path / ".zattrs").write_text(json.dumps(attrs))
    elif breakage == "no_data_group":
        shutil.rmtree(path / "data")
    with pytest.raises(DatasetError, match=message):
        ReplayBuffer.open(path)


def test_corrupt_chunk_error_names_key(tmp_path):
    path = _good(tmp_path)
    chunk = path / "data" / "robot0_eef_pos" / "0.0"
    chunk.write_bytes(b"\x00garbage" * 3)
    rb = ReplayBuffer.open(path)  # metadata is fine; the chunk fails when read
    with pytest.raises(DatasetError, match=r"data/robot0_eef_pos: cannot read rows 0\.\.10"):
        rb.get_episode(0)
    np.testing.assert_array_equal(rb.get_episode(1, keys=["action"])["action"], make_episode(8, 1)["action"])


def test_bad_episodes_are_refused_and_nothing_is_lost(tmp_path):
    path = _good(tmp_path)
    rb = ReplayBuffer.open(path, mode="a")
    ep = make_episode(5, 2)
    cases = [
        ({**ep, "action": ep["action"][:4]}, r"'action': 4 steps"),
        ({k: v for k, v in ep.items() if k != "reward"}, r"missing key\(s\) \['reward'\]"),
        ({**ep, "extra": np.zeros(5)}, r"key\(s\) \['extra'\] that the dataset does not hold"),
        ({**ep, "robot0_eef_pos": np.zeros((5, 4), np.float32)}, r"'robot0_eef_pos': per-step shape \(4,\)"),
        ({**ep, "agentview_image": ep["agentview_image"].astype(np.float32)}, r"'agentview_image': dtype float32"),
        ({**ep, "action": np.full((5, 7), np.nan, np.float32)}, r"'action' contains NaN"),
    ]
    for bad, msg in cases:
        with pytest.raises(DatasetError, match=msg):
            rb.add_episode(bad)
    rb.add_episode(ep)
    rb = ReplayBuffer.open(path)
    assert rb.episode_ends.tolist() == [10, 18, 23]
    np.testing.assert_array_equal(rb.get_episode(2)["action"], ep["action"])


def test_first_episode_must_match_attrs_spec(tmp_path):
    rb = ReplayBuffer.create(tmp_path / "d.zarr", make_attrs())
    ep = make_episode(5, 0)
    del ep["robot0_eef_pos"]
    with pytest.raises(DatasetError, match="'robot0_eef_pos' is in the spec but not in the data"):
        rb.add_episode(ep)
    with pytest.raises(FileExistsError):
        ReplayBuffer.create(tmp_path / "d.zarr", make_attrs())


def test_create_refuses_zip_and_attrs_validate(tmp_path):
    with pytest.raises(DatasetError, match="zip"):
        ReplayBuffer.create(tmp_path / "x.zarr.zip", make_attrs())
    with pytest.raises(ValueError, match="control_hz"):
        DatasetAttrs("lift", 10.0, make_attrs().spec, "human")
    with pytest.raises(ValueError, match="source"):
        DatasetAttrs("lift", 20.0, make_attrs().spec, "dreamt")


def test_format3_store_reads_but_refuses_append_before_touching_it(tmp_path):
    path = tmp_path / "v3.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_group("data").create_array(name="action", shape=(5, 2), dtype=np.float32)[:] = np.ones((5, 2))
    root.create_group("meta").create_array(name="episode_ends", shape=(1,), dtype=np.int64)[:] = [5]
    assert ReplayBuffer.open(path).get_episode(0)["action"].sum() == 10
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(DatasetError, match="not a zarr format 2 array"):
        ReplayBuffer.open(path, mode="a")
    assert sorted(p.name for p in path.rglob("*")) == before


def test_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: not a zarr group"):
        ReplayBuffer.open(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.open(tmp_path / "missing.zarr")
