"""`dpstack data info|convert|video` through the real dispatcher."""
import imageio.v2 as imageio
import numpy as np
import pytest

from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer
from dpstack.cli import main
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

from _data_helpers import write_robomimic


def small_dataset(path, n_episodes=3, with_images=True):
    obs = [ArraySpec("robot0_eef_pos", (3,))]
    if with_images:
        obs.append(ArraySpec("agentview_image", (32, 48, 3), "uint8"))
    spec = RobotSpec("lift", "Panda", 10.0, tuple(obs), ActionSpec(shape=(7,), gripper_dims=(6,)))
    rb = ReplayBuffer.create(path, DatasetAttrs("lift", 10.0, spec, "human"))
    for e in range(n_episodes):
        T = 8 + e
        ep = {"robot0_eef_pos": np.full((T, 3), e, np.float32) + np.arange(3, dtype=np.float32),
              "action": np.zeros((T, 7), np.float32)}
        if with_images:
            # a bright square that moves: frames differ, so the video has real content
            img = np.zeros((T, 32, 48, 3), np.uint8)
            for t in range(T):
                img[t, 8:24, 2 * t:2 * t + 16] = (255, 128, 0)
            ep["agentview_image"] = img
        rb.add_episode(ep)
    return rb


def test_info_prints_episode_count_stats_and_attrs(tmp_path, capsys):
    small_dataset(tmp_path / "d.zarr", n_episodes=3)
    assert main(["data", "info", str(tmp_path / "d.zarr")]) == 0
    out = capsys.readouterr().out
    assert "episodes  3" in out and "steps     27" in out
    assert "task      lift" in out and "rate      10 Hz" in out and "source    human" in out
    assert "agentview_image" in out and "gripper dims [6]" in out
    # per-dim stats of robot0_eef_pos: values e + [0, 1, 2] for e in 0..2
    assert "min  [0, 1, 2]" in out and "max  [2, 3, 4]" in out


def test_info_reports_a_broken_dataset_clearly(tmp_path, capsys):
    small_dataset(tmp_path / "d.zarr")
    import shutil
    shutil.rmtree(tmp_path / "d.zarr" / "meta" / "episode_ends")
    assert main(["data", "info", str(tmp_path / "d.zarr")]) == 2
    assert "missing meta/episode_ends" in capsys.readouterr().err


def test_video_writes_a_readable_mp4(tmp_path):
    small_dataset(tmp_path / "d.zarr")
    out = tmp_path / "ep1.mp4"
    assert main(["data", "video", str(tmp_path / "d.zarr"), "--episode", "1", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    with imageio.get_reader(out, format="FFMPEG") as reader:  # len() is inf for ffmpeg: iterate
        frames = list(reader.iter_data())
    assert len(frames) == 9  # episode 1 has 8 + 1 steps
    assert frames[0].shape == (32, 48, 3)
    # lossy codec, but the orange square must be where it was stored
    assert frames[0][16, 8, 0] > 200 and frames[0][16, 40, 0] < 60
    assert frames[4][16, 20, 0] > 200


def test_video_without_image_keys_is_a_clear_error(tmp_path, capsys):
    small_dataset(tmp_path / "d.zarr", with_images=False)
    assert main(["data", "video", str(tmp_path / "d.zarr"), "--episode", "0", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "no image keys" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_convert_via_cli(tmp_path, capsys):
    write_robomimic(tmp_path / "src.hdf5")
    dst = tmp_path / "out.zarr"
    assert main(["data", "convert", str(tmp_path / "src.hdf5"), "--out", str(dst),
                 "--obs-keys", "robot0_eef_pos", "agentview_image"]) == 0
    assert "wrote 4 episodes" in capsys.readouterr().out
    rb = ReplayBuffer.open(dst)
    assert rb.attrs.spec.obs_keys == ("robot0_eef_pos", "agentview_image")
    # refuses to overwrite without --overwrite, and names the flag
    assert main(["data", "convert", str(tmp_path / "src.hdf5"), "--out", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert ReplayBuffer.open(dst).attrs.spec.obs_keys == ("robot0_eef_pos", "agentview_image")


def test_convert_robot_and_rename_flags(tmp_path, capsys):
    write_robomimic(tmp_path / "src.hdf5")
    dst = tmp_path / "out.zarr"
    assert main(["data", "convert", str(tmp_path / "src.hdf5"), "--out", str(dst), "--robot", "UR5e",
                 "--rename", "robot0_eef_pos=eef", "--rename", "agentview_image=cam_image"]) == 0
    spec = ReplayBuffer.open(dst).attrs.spec
    assert spec.robot == "UR5e" and set(spec.obs_keys) == {"eef", "object-state", "cam_image"}
    assert main(["data", "convert", str(tmp_path / "src.hdf5"), "--out", str(tmp_path / "x.zarr"),
                 "--rename", "robot0_eef_pos"]) == 2
    assert "OLD=NEW" in capsys.readouterr().err


def test_video_key_takes_several_values(tmp_path):
    rb = small_dataset(tmp_path / "d.zarr")
    out = tmp_path / "ep0.mp4"
    assert main(["data", "video", str(tmp_path / "d.zarr"), "--episode", "0", "--key", "agentview_image",
                 "agentview_image", "--out", str(out)]) == 0
    with imageio.get_reader(out, format="FFMPEG") as reader:
        assert next(reader.iter_data()).shape == (32, 96, 3)        # the same camera twice, side by side


def test_help_texts():
    with pytest.raises(SystemExit) as e:
        main(["data", "convert", "--help"])
    assert e.value.code == 0
