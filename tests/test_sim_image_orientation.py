"""Stored frames are upright (row 0 = top of the scene), checked against what robosuite renders."""
import numpy as np
import pytest

pytest.importorskip("robosuite")

from dpstack.sim.env import SimEnv  # noqa: E402

CAMERAS = ("agentview", "robot0_eye_in_hand")
SIZE = 48


def _red_rows(img: np.ndarray) -> float:
    """Mean row of the red cube's pixels."""
    rgb = img.astype(np.int16)
    red = (rgb[..., 0] > 120) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() >= 3, "the cube is not in view"
    return float(np.nonzero(red)[0].mean())


def _render_now(env: SimEnv) -> dict[str, np.ndarray]:
    env.raw.sim.forward()
    return env._convert(env.raw._get_observations(force_update=True))


@pytest.fixture
def lift_cams():
    # One per test: closing another env's EGL context leaves this one rendering garbage.
    env = SimEnv("lift", seed=3, cameras=CAMERAS, image_size=SIZE)
    yield env
    env.close()


def test_lifting_the_cube_moves_it_up_in_the_agentview_frame(lift_cams):
    env = lift_cams
    before = env.reset(seed=3)["agentview_image"]
    joint = env.raw.cube.joints[0]
    qpos = np.array(env.raw.sim.data.get_joint_qpos(joint))
    qpos[2] += 0.2  # 20 cm straight up in the world
    env.raw.sim.data.set_joint_qpos(joint, qpos)
    after = _render_now(env)["agentview_image"]
    # Upright: higher in the world is a smaller row index.
    assert _red_rows(after) < _red_rows(before) - 3


def test_frames_do_not_depend_on_robosuites_image_convention(lift_cams, monkeypatch):
    """robosuite's own "opencv" convention renders top row first; our frames must equal it
    whichever convention robosuite was set to when the env was made."""
    from robosuite import macros

    default = lift_cams.reset(seed=5)
    monkeypatch.setattr(macros, "IMAGE_CONVENTION", "opencv")
    env = SimEnv("lift", seed=5, cameras=CAMERAS, image_size=SIZE)
    try:
        opencv_obs = env.reset()
        raw = env.raw_observation("agentview_image")
    finally:
        env.close()
    np.testing.assert_array_equal(opencv_obs["agentview_image"], raw)  # robosuite's upright render, as is
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        assert not np.array_equal(default[key], default[key][::-1])
        np.testing.assert_array_equal(default[key], opencv_obs[key], err_msg=key)


def test_robomimic_import_of_robosuite_renders_matches_the_simulators_frames(lift_cams, tmp_path):
    """A file holding robosuite's raw (bottom row first) renders and declaring it, as LIBERO's
    do, imports to exactly the frames `dpstack collect` stores."""
    import json

    import h5py

    from dpstack.data.robomimic import convert_robomimic

    env = lift_cams
    upright, raw = [], []
    for seed in (7, 8):
        upright.append(env.reset(seed=seed)["agentview_image"])
        raw.append(np.array(env.raw_observation("agentview_image"), dtype=np.uint8))
    src = tmp_path / "rendered.hdf5"
    with h5py.File(src, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "env_kwargs": {"control_freq": 20}})
        data.attrs["macros_image_convention"] = "opengl"
        demo = data.create_group("demo_0")
        demo.create_dataset("obs/agentview_image", data=np.stack(raw))
        demo.create_dataset("actions", data=np.zeros((2, 7)))
    rb = convert_robomimic(src, tmp_path / "out.zarr", progress=False)
    np.testing.assert_array_equal(rb.get_episode(0)["agentview_image"], np.stack(upright))


def test_cameras_render_without_the_mirror_pass(lift_cams):
    """The table's reflection doubles software rendering time for about one grey level:
    stored frames are the scene drawn once, not with its mirror image."""
    import mujoco

    env = lift_cams
    env.reset(seed=3)
    stored = _render_now(env)["agentview_image"]  # the path every step's observation takes
    flags = env.raw.sim._render_context_offscreen.scn.flags
    flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 1
    try:
        mirrored = _render_now(env)["agentview_image"]
    finally:
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    plain = _render_now(env)["agentview_image"]
    np.testing.assert_array_equal(stored, plain)
    assert not np.array_equal(stored, mirrored), "the reflection pass changes no pixel: the test sees nothing"
    assert np.abs(stored.astype(np.int16) - mirrored).mean() < 4.0, "skipping the mirror changes the frame a lot"
