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
