"""Diffusion Policy zarr stores as they are: `dpstack data describe` writes the attrs into a
directory store, and a store without attrs (directory or .zarr.zip) trains from a config."""
import hashlib
import json

import numpy as np
import pytest
import zarr

from dpstack.cli import main
from dpstack.data.replay_buffer import ReplayBuffer
from dpstack.policy.config import ConfigError, DataConfig, PolicyConfig
from dpstack.policy.dataset import load_dataset

from _data_helpers import build_dp_store

LENGTHS = [9, 12, 4]


def file_digests(root, skip=()):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture
def dp_dir(tmp_path):
    path = tmp_path / "pusht_cchi_v7_replay.zarr"
    build_dp_store(str(path), LENGTHS)
    return path


@pytest.fixture
def dp_zip(tmp_path):
    path = tmp_path / "pusht.zarr.zip"
    store = zarr.storage.ZipStore(path, mode="w")
    build_dp_store(store, LENGTHS)
    store.close()
    return path


def test_describe_writes_attrs_and_touches_nothing_else(dp_dir, capsys):
    before = file_digests(dp_dir, skip=(".zattrs",))
    assert main(["data", "describe", str(dp_dir), "--obs", "state,img", "--action", "action", "--hz", "10"]) == 0
    assert "described" in capsys.readouterr().out
    assert file_digests(dp_dir, skip=(".zattrs",)) == before
    assert [p.name for p in dp_dir.rglob("*.partial")] == []
    with ReplayBuffer.open(dp_dir) as rb:
        a = rb.attrs
        assert a.control_hz == 10.0 and a.task == "pusht_cchi_v7_replay" and a.source == "import"
        assert a.spec.obs_keys == ("state", "img")
        assert a.spec.obs("img").shape == (6, 6, 3) and a.spec.obs("img").dtype == "uint8"
        assert a.spec.action.shape == (2,) and a.spec.action.gripper_dims == ()
    # The attrs are plain zarr-2 JSON next to the keys DP's own code reads.
    assert json.loads((dp_dir / ".zattrs").read_text())["spec"]["action"]["key"] == "action"
    data = load_dataset(dp_dir, PolicyConfig(obs_keys=("state", "img"), image_keys=("img",)))
    assert data.spec.obs_keys == ("state", "img") and data.episode_ends.tolist() == [9, 21, 25]


def test_describe_refuses_what_it_cannot_do_safely(dp_dir, dp_zip, capsys):
    def describe(path, *extra):
        rc = main(["data", "describe", str(path), "--obs", "state", "--hz", "10", *extra])
        return rc, capsys.readouterr().err

    rc, err = describe(dp_dir, "--action", "act")
    assert rc == 2 and "no array 'act'" in err and "'action'" in err and "Traceback" not in err
    rc, err = describe(dp_zip)
    assert rc == 2 and "read-only" in err and "data.control_hz" in err
    assert describe(dp_dir, "--task", "pusht")[0] == 0
    before = file_digests(dp_dir)
    rc, err = describe(dp_dir, "--hz", "5")
    assert rc == 2 and "already has dpstack attrs" in err and "--replace" in err
    assert file_digests(dp_dir) == before
    assert describe(dp_dir, "--hz", "5", "--replace")[0] == 0
    assert ReplayBuffer.open(dp_dir).attrs.control_hz == 5.0


def test_zip_store_trains_in_place_from_the_config(dp_zip):
    before = hashlib.sha256(dp_zip.read_bytes()).hexdigest()
    cfg = PolicyConfig(obs_keys=("state", "img"), image_keys=("img",))
    with pytest.raises(ConfigError, match="data.control_hz"):
        load_dataset(dp_zip, cfg)
    data = load_dataset(dp_zip, cfg, data=DataConfig(control_hz=10.0, task="pusht"))
    assert data.spec.control_hz == 10.0 and data.spec.task == "pusht" and data.spec.action.key == "action"
    with ReplayBuffer.open(dp_zip) as rb:
        raw = rb.load(["action"])["action"]
    np.testing.assert_allclose(data.normalizer.unnormalize("action", data.arrays["action"]), raw, atol=1e-5)
    with pytest.raises(ConfigError, match="no array 'nope'"):
        load_dataset(dp_zip, PolicyConfig(obs_keys=("nope",)), data=DataConfig(control_hz=10.0))
    assert hashlib.sha256(dp_zip.read_bytes()).hexdigest() == before


def test_train_cli_on_a_zip_store_without_python(dp_zip, tmp_path, capsys):
    rc = main(["train", "--dataset", str(dp_zip), "--out", str(tmp_path / "run"), "--quiet", "--set",
               "data.control_hz=10", "policy.obs_keys=[state]", "policy.preset=test",
               "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
               "train.eval_every=0", "train.cpu_threads=1"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").is_file()


def test_an_action_stored_under_another_name_trains_as_the_action(dp_dir):
    root = zarr.open_group(str(dp_dir), mode="r+")
    cmd = root["data/action"][:] * 2 + 1
    root["data"].create_array(name="cmd", shape=cmd.shape, chunks=(7, 2), dtype=cmd.dtype)[:] = cmd
    assert main(["data", "describe", str(dp_dir), "--obs", "state", "--action", "cmd", "--hz", "10"]) == 0
    data = load_dataset(dp_dir, PolicyConfig(obs_keys=("state",)))
    assert data.spec.action.key == "action" and set(data.arrays) == {"state", "action"}
    np.testing.assert_allclose(data.normalizer.unnormalize("action", data.arrays["action"]), cmd, atol=1e-5)
    with pytest.raises(ConfigError, match="data.action_key 'other' differs"):
        load_dataset(dp_dir, PolicyConfig(obs_keys=("state",)), data=DataConfig(action_key="other"))
