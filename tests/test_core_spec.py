"""The shared shape description, schedule and normaliser that every part meets through."""
import numpy as np
import pytest

from dpstack.core.normalizer import Normalizer
from dpstack.core.schedule import NoiseSchedule
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec, SpecMismatch


def make_spec(**over) -> RobotSpec:
    fields = dict(task="lift", robot="Panda", control_hz=20.0,
                  observations=(ArraySpec("eef_pos", (3,), names=("x", "y", "z")), ArraySpec("agentview_image", (84, 84, 3), "uint8")),
                  action=ActionSpec(shape=(7,), gripper_dims=(6,), low=(-1,) * 7, high=(1,) * 7))
    fields.update(over)
    return RobotSpec(**fields)


def test_spec_round_trips_through_plain_data():
    spec = make_spec()
    assert RobotSpec.from_dict(spec.to_dict()) == spec


def test_check_serves_names_every_difference():
    policy = make_spec()
    robot = make_spec(robot="UR5e", control_hz=10.0,
                      observations=(ArraySpec("eef_pos", (4,)),),
                      action=ActionSpec(shape=(8,), gripper_dims=(7,)))
    with pytest.raises(SpecMismatch) as err:
        policy.check_serves(robot)
    msg = str(err.value)
    for part in ("robot", "control_hz", "eef_pos", "agentview_image", "action"):
        assert part in msg


def test_robot_may_publish_extra_observations():
    policy = make_spec().with_observations(["eef_pos"])
    policy.check_serves(make_spec())


def test_array_spec_rejects_wrong_shape_and_nan():
    spec = ArraySpec("eef_pos", (3,))
    spec.check(np.zeros((2, 3)), leading=1)
    with pytest.raises(ValueError, match="eef_pos"):
        spec.check(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        spec.check(np.array([0, np.nan, 0]))


def test_bad_spec_fields_are_refused():
    with pytest.raises(ValueError, match="gripper dim"):
        ActionSpec(shape=(7,), gripper_dims=(7,))
    with pytest.raises(ValueError, match="missing field"):
        RobotSpec.from_dict({"task": "lift"})


def test_schedule_recovers_x0_with_exact_noise_per_position():
    s = NoiseSchedule()
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (2, 16, 7)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = rng.integers(0, 100, (2, 16))
    xt = s.add_noise(x0, noise, t)
    clean = np.full_like(t, -1)
    np.testing.assert_allclose(s.ddim_step(xt, noise, t, clean), x0, atol=1e-4)
    np.testing.assert_allclose(s.ddpm_step(xt, noise, t, clean, rng.standard_normal(x0.shape)), x0, atol=1e-4)


def test_ddpm_step_keeps_positions_whose_level_does_not_change():
    s = NoiseSchedule()
    x = np.ones((1, 4, 2), np.float32)
    t = np.array([[10, 20, 30, 40]])
    out = s.ddpm_step(x, np.zeros_like(x), t, np.array([[10, 19, 30, 39]]), np.ones_like(x))
    np.testing.assert_array_equal(out[0, [0, 2]], x[0, [0, 2]])
    assert not np.allclose(out[0, [1, 3]], x[0, [1, 3]])


def test_schedule_levels_and_validation():
    s = NoiseSchedule()
    assert s.inference_levels(10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert s.alpha_bar(np.array(-1)) == 1.0
    assert 0 < s.alphas_cumprod[-1] < 1e-3 and s.alphas_cumprod[0] > 0.99
    with pytest.raises(ValueError):
        s.inference_levels(0)
    with pytest.raises(ValueError):
        NoiseSchedule(beta_schedule="exec('rm -rf /')")


def test_normalizer_maps_to_unit_box_and_back():
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, (500, 4))
    x[:, 3] = 7.0
    norm = Normalizer.fit({"a": x})
    y = norm.normalize("a", x)
    np.testing.assert_allclose(y[:, :3].min(0), -1, atol=1e-5)
    np.testing.assert_allclose(y[:, :3].max(0), 1, atol=1e-5)
    np.testing.assert_allclose(y[:, 3], 0, atol=1e-6)  # constant dim centred, not blown up
    back = Normalizer.from_dict(norm.to_dict())
    np.testing.assert_allclose(back.unnormalize("a", y), x, atol=1e-4)
    with pytest.raises(ValueError):
        Normalizer.fit({"a": np.array([[np.nan]])})
