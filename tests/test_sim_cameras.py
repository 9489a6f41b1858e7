"""The cameras a simulated arm renders come from the policy's spec, and a camera the
task's scene lacks is named in one sentence."""
from __future__ import annotations

import pytest

from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

pytest.importorskip("robosuite")

from dpstack.sim.env import SimEnv, check_cameras, spec_cameras  # noqa: E402


def _spec(*observations: ArraySpec) -> RobotSpec:
    return RobotSpec("lift", "Panda", 20.0, (ArraySpec("robot0_eef_pos", (3,)), *observations), ActionSpec(shape=(7,)))


def test_cameras_and_their_size_come_from_the_image_observations():
    spec = _spec(ArraySpec("agentview_image", (76, 84, 3), "uint8"), ArraySpec("robot0_eye_in_hand_image", (76, 84, 3), "uint8"))
    assert spec_cameras(spec) == (("agentview", "robot0_eye_in_hand"), (76, 84))
    assert spec_cameras(_spec()) == ((), None)  # a state policy renders nothing


def test_images_the_simulator_cannot_render_as_specified_are_refused():
    with pytest.raises(ValueError, match="'depth' .* is not a camera the simulator renders"):
        spec_cameras(_spec(ArraySpec("depth", (84, 84, 3), "uint8")))
    with pytest.raises(ValueError, match="different sizes"):
        spec_cameras(_spec(ArraySpec("a_image", (84, 84, 3), "uint8"), ArraySpec("b_image", (64, 64, 3), "uint8")))


def test_a_camera_the_task_lacks_is_named_with_the_ones_it_has():
    check_cameras("lift", ("agentview", "robot0_eye_in_hand"))
    with pytest.raises(ValueError) as e:
        SimEnv("lift", cameras=("agentview", "wristcam"))
    message = str(e.value)
    assert message.startswith("the policy needs camera 'wristcam', which task 'lift' cannot render")
    assert "agentview" in message and "\n" not in message


def test_render_time_is_measured_apart_from_physics():
    env = SimEnv("lift", seed=0, cameras=("agentview",), image_size=(32, 32))
    try:
        env.reset()
        env.take_render_seconds()
        env.step([0.0] * 7)
        assert env.take_render_seconds() > 0  # the step rendered the camera
        assert env.take_render_seconds() == 0.0  # and the count starts again
    finally:
        env.close()
