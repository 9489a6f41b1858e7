"""Scripted experts on real robosuite physics: they succeed, are seeded, and vary."""
import numpy as np
import pytest

pytest.importorskip("robosuite")

from dpstack.sim.env import SimEnv  # noqa: E402
from dpstack.sim.experts import run_expert_episode, square_nut_carry_yaw  # noqa: E402

# (task, seeds, longest acceptable episode): a handful of seeds keeps this quick.
CASES = [("lift", (100, 101, 102, 103), 100), ("can", (100, 101, 102), 250), ("stack", (100, 101, 102), 200),
         ("square", (100, 101, 102), 250)]


@pytest.mark.slow
@pytest.mark.parametrize("task,seeds,max_len", CASES, ids=[c[0] for c in CASES])
def test_expert_solves_the_task(task, seeds, max_len):
    env = SimEnv(task, seed=None)
    try:
        episodes = [run_expert_episode(env, s) for s in seeds]
        assert env.success()  # the last episode ended in a success state, judged by robosuite
    finally:
        env.close()
    for ep in episodes:
        assert ep.success, f"{task} seed {ep.seed} failed"
        T = len(ep.steps["action"])
        assert T <= max_len, f"{task} seed {ep.seed}: {T} steps"
        assert all(len(v) == T for v in ep.steps.values())
        assert ep.steps["action"].dtype == np.float32 and np.all(np.abs(ep.steps["action"]) <= 1.0)
        assert set(np.unique(ep.steps["action"][:, 6])) <= {-1.0, 1.0}
    # Demos differ between seeds (not one replayed trajectory).
    a, b = episodes[0].steps["action"], episodes[1].steps["action"]
    assert len(a) != len(b) or not np.allclose(a, b)


def test_expert_is_reproducible_from_its_seed():
    env = SimEnv("lift", seed=None)
    try:
        first = run_expert_episode(env, 11)
        second = run_expert_episode(env, 11)
    finally:
        env.close()
    assert first.success == second.success
    for k in first.steps:
        np.testing.assert_array_equal(first.steps[k], second.steps[k], err_msg=k)


def test_square_nut_is_carried_square_to_the_peg_with_its_handle_in_reach():
    for nut_yaw in np.linspace(-np.pi, np.pi, 73):  # robosuite places the nut at any yaw
        # The expert grasps the handle with the gripper yawed like the nut, the way
        # round nearest straight ahead.
        grip = (nut_yaw + np.pi / 2) % np.pi - np.pi / 2
        carry = square_nut_carry_yaw(nut_yaw, grip)
        final = nut_yaw + carry - grip  # the nut turns with the gripper
        quarter_turns = final / (np.pi / 2)
        assert abs(quarter_turns - round(quarter_turns)) < 1e-9, nut_yaw  # hole square to the peg
        assert round(quarter_turns) % 4 != 0, nut_yaw  # handle not on the peg's far side (+x): out of reach
        assert -1.7 <= carry <= 3.2, nut_yaw  # the wrist's range, pointing down
        assert abs(carry - grip) <= 3 * np.pi / 4 + 1e-9, nut_yaw  # never the long way round


@pytest.mark.slow
def test_a_recovery_episode_starts_at_the_missed_grasp_and_still_succeeds():
    env = SimEnv("can", seed=None)
    try:
        env.reset(seed=5)
        can = env.raw.obj_body_id["Can"]
        can_at_start = env.raw.sim.data.body_xpos[can].copy()
        rec = run_expert_episode(env, 5, recovery=1.0)
        can_at_end = env.raw.sim.data.body_xpos[can].copy()
    finally:
        env.close()
    assert rec.success and rec.recovery
    first = rec.steps["robot0_eef_pos"][0]
    # The demonstration opens low beside the can (the miss itself is not recorded),
    # then opens the gripper and rises ...
    off = float(np.linalg.norm(first[:2] - can_at_start[:2]))
    assert 0.015 < off < 0.08, off
    assert first[2] < can_at_start[2] + 0.04
    assert rec.steps["action"][0, 6] == -1.0 and rec.steps["action"][0, 2] > 0
    assert np.linalg.norm(can_at_end[:2] - can_at_start[:2]) > 0.1  # ... and ends with the can carried to its bin


def test_episodes_drawn_without_a_recovery_are_unchanged_by_the_fraction():
    env = SimEnv("lift", seed=None)
    try:
        mixed = [run_expert_episode(env, s, recovery=0.5) for s in range(6)]
        assert any(m.recovery for m in mixed) and not all(m.recovery for m in mixed)
        for m in mixed:
            plain = run_expert_episode(env, m.seed)
            same = len(plain.steps["action"]) == len(m.steps["action"]) and np.array_equal(
                plain.steps["action"], m.steps["action"])
            assert same != m.recovery, m.seed
    finally:
        env.close()


def test_recovery_must_be_a_fraction():
    from dpstack.sim.experts import make_expert
    env = SimEnv("lift", seed=None)
    try:
        env.reset(seed=0)
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="fraction"):
                make_expert(env, 0, bad)
    finally:
        env.close()
