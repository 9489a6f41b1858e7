"""Sampler math checked against denoisers whose exact answer is known in closed form."""
from dataclasses import replace

import numpy as np
import pytest

from dpstack.runtime.samplers import sample_full
from dpstack.core.schedule import NoiseSchedule


def gaussian_target_denoiser(schedule: NoiseSchedule, mu: np.ndarray, sigma: float):
    """The exact E[eps | x_t] when the clean data are N(mu, sigma^2) per entry."""
    def denoise(x, t, cond):
        ab = schedule.alpha_bar(t)[..., None]
        var_t = ab * sigma**2 + 1.0 - ab
        return (np.sqrt(1.0 - ab) * (x - np.sqrt(ab) * mu) / var_t).astype(np.float32)
    return denoise


def expected_output_moments(schedule: NoiseSchedule, levels, mu: float, sigma: float, method: str):
    """Mean and variance of the sampler output for N(mu, sigma^2) data, by the linear-Gaussian recursion.

    Written from the DDPM/DDIM equations directly (not via NoiseSchedule's step
    functions), so it checks the sampler's bookkeeping and the step maths.
    """
    ab_all = np.concatenate([[1.0], np.cumprod(1.0 - schedule.betas)])  # index t + 1
    m, v = 0.0, 1.0  # x at levels[0] starts as N(0, 1)
    for i, t in enumerate(levels):
        p = levels[i + 1] if i + 1 < len(levels) else -1
        ab, ab_p = ab_all[t + 1], ab_all[p + 1]
        var_t = ab * sigma**2 + 1 - ab
        # posterior mean of x0 and the implied eps are linear in x: x0 = k x + c, eps = (x - sqrt(ab) x0) / sqrt(1 - ab)
        k, c = np.sqrt(ab) * sigma**2 / var_t, mu * (1 - ab) / var_t
        if method == "ddpm":
            a_t = ab / ab_p
            c0, c1 = np.sqrt(ab_p) * (1 - a_t) / (1 - ab), np.sqrt(a_t) * (1 - ab_p) / (1 - ab)
            slope, shift, noise_var = c0 * k + c1, c0 * c, (1 - ab_p) / (1 - ab) * (1 - a_t) if p >= 0 else 0.0
        else:
            ke, ce = (1 - np.sqrt(ab) * k) / np.sqrt(1 - ab), -np.sqrt(ab) * c / np.sqrt(1 - ab)
            slope, shift, noise_var = np.sqrt(ab_p) * k + np.sqrt(1 - ab_p) * ke, np.sqrt(ab_p) * c + np.sqrt(1 - ab_p) * ce, 0.0
        m, v = slope * m + shift, slope**2 * v + noise_var
    return m, v


@pytest.mark.parametrize("method,steps", [("ddpm", 100), ("ddpm", 20), ("ddim", 10)])
def test_exact_denoiser_gives_the_predicted_distribution(method, steps):
    schedule = NoiseSchedule()
    mu, sigma = 0.3, 0.25
    target = np.full((1, 4, 3), mu, np.float32)
    rng = np.random.default_rng(0)
    levels = schedule.inference_levels(steps)
    x = sample_full(gaussian_target_denoiser(schedule, target, sigma), np.zeros((1, 2), np.float32), schedule,
                    levels, (5000, 4, 3), rng, method=method)
    assert x.shape == (5000, 4, 3) and x.dtype == np.float32
    m, v = expected_output_moments(schedule, levels, mu, sigma, method)
    assert abs(x.mean() - m) < 0.004
    assert abs(x.std() - np.sqrt(v)) < 0.01 * np.sqrt(v)
    assert abs(m - mu) < 0.01 and 0.75 * sigma < np.sqrt(v) <= 1.01 * sigma  # and the sampler does approach the target


def test_point_mass_target_is_hit_exactly():
    schedule = NoiseSchedule()
    mu = np.full((1, 16, 2), 0.7, np.float32)

    def denoise(x, t, cond):
        ab = schedule.alpha_bar(t)[..., None]
        return ((x - np.sqrt(ab) * mu) / np.sqrt(1.0 - ab)).astype(np.float32)

    for method in ("ddpm", "ddim"):
        x = sample_full(denoise, np.zeros(3, np.float32), schedule, schedule.inference_levels(10), (2, 16, 2),
                        np.random.default_rng(1), method=method)
        np.testing.assert_allclose(x, 0.7, atol=1e-5)


def test_same_seed_same_sample_and_bad_levels_refused():
    schedule = NoiseSchedule()
    denoise = lambda x, t, c: 0.1 * x  # noqa: E731
    args = (denoise, np.zeros(2, np.float32), schedule, schedule.inference_levels(8), (1, 5, 2))
    a = sample_full(*args, np.random.default_rng(3))
    b = sample_full(*args, np.random.default_rng(3))
    c = sample_full(*args, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="descending"):
        sample_full(denoise, np.zeros(2, np.float32), schedule, [0, 5], (1, 5, 2), np.random.default_rng(0))


# -- streaming ladder ---------------------------------------------------------------------

from dpstack.core.ladder import ladder_levels, rung_gap  # noqa: E402
from dpstack.runtime.samplers import (ChunkGeometry, RTISampler, SamplerConfig, StreamingSampler, TrainedRegimes,  # noqa: E402
                              advance_ladder, build_sampler, rti_list, shift_chunk)


def point_mass_denoiser(schedule: NoiseSchedule, mu: np.ndarray, calls: list | None = None):
    """Exact eps when every clean action equals mu; records (x, t) of each call."""
    def denoise(x, t, cond):
        if calls is not None:
            calls.append((x.copy(), t.copy()))
        ab = schedule.alpha_bar(t)[..., None]
        return ((x - np.sqrt(ab) * mu) / np.sqrt(1.0 - ab)).astype(np.float32)
    return denoise


@pytest.mark.parametrize("evals", [1, 2, 6])
def test_streaming_levels_seen_by_the_network_and_kept_between_steps(evals):
    schedule = NoiseSchedule()
    tp, to, rungs = 16, 2, 15
    calls = []
    mu = np.full((1, tp, 3), 0.2, np.float32)
    s = StreamingSampler(point_mass_denoiser(schedule, mu, calls), schedule, ChunkGeometry(tp, to, 3), rungs,
                         evals_per_step=evals, startup_steps=10, seed=0)
    ladder = ladder_levels(tp, to, rungs, 100)
    gap = rung_gap(100, rungs)
    first = s.step(np.zeros(4, np.float32))
    assert first.nfe == 10 + evals
    for _ in range(5):
        calls.clear()
        out = s.step(np.zeros(4, np.float32))
        assert out.nfe == evals == len(calls)
        for e, (_, t) in enumerate(calls):  # evaluation e sees the ladder shifted by e * gap // evals
            assert t.shape == (1, tp)
            np.testing.assert_array_equal(t[0], ladder - e * gap // evals)
        np.testing.assert_array_equal(s.buffer_levels, ladder)  # the invariant between calls
        # one clean action to execute, then the rest of the horizon as look-ahead
        assert out.indices.tolist() == list(range(to - 1, tp)) and out.actions.shape == (tp - to + 1, 3)
        assert out.replan_after == 1
        np.testing.assert_allclose(out.actions[:1], 0.2, atol=1e-5)  # executed positions are clean
        # the look-ahead is the network's clean estimate, not the still-noisy buffer (whose top
        # positions are nearly pure noise): with an exact denoiser it is the target itself
        np.testing.assert_allclose(out.actions[1:], 0.2, atol=1e-4)
        assert np.abs(out.trajectory[to:] - 0.2).max() > 0.5


@pytest.mark.parametrize("rungs,evals", [(14, 1), (4, 3)])  # 4 rungs of 3 positions: the top rung has 2 more to lift
def test_streaming_with_exact_denoiser_keeps_every_position_at_its_level(rungs, evals):
    """If any position's level were wrong (e.g. executed history not re-noised), its
    standardised residual (x - sqrt(ab) mu) / sqrt(1 - ab) would not be N(0, 1)."""
    schedule = NoiseSchedule()
    tp, to = 16, 3
    mu = np.tile(np.array([0.6, -0.4], np.float32), (1, tp, 1))  # constant along the horizon: contents move with the shift
    s = StreamingSampler(point_mass_denoiser(schedule, mu), schedule, ChunkGeometry(tp, to, 2), n_rungs=rungs,
                         evals_per_step=evals, startup_steps=10, seed=1)
    res = []
    for _ in range(400):
        s.step(np.zeros(1, np.float32))
        ab = schedule.alpha_bar(s.buffer_levels)[:, None]
        res.append((s.buffer - np.sqrt(ab) * mu[0]) / np.sqrt(1 - ab))
    res = np.stack(res)  # (steps, Tp, A)
    np.testing.assert_allclose(res.mean(axis=(0, 2)), 0.0, atol=0.12)
    np.testing.assert_allclose(res.std(axis=(0, 2)), 1.0, atol=0.1)


def test_advance_ladder_shift_semantics():
    schedule = NoiseSchedule()
    tp, to, a = 8, 2, 2
    ladder = ladder_levels(tp, to, 7, 100)
    below = np.concatenate([[-1, -1], ladder[1:-1]])  # after a step: history + bottom rung clean, others one rung down
    x = np.arange(tp * a, dtype=np.float32).reshape(tp, a) / 20.0
    fresh = np.full((1, a), 7.0, np.float32)
    noise = np.full((tp, a), -0.5, np.float32)
    buf, lv = advance_ladder(schedule, x, below, ladder, 1, fresh, noise)
    np.testing.assert_array_equal(lv, ladder)
    ab0 = schedule.alpha_bar(ladder[0])
    # the executed action (old position To-1) becomes history, re-noised from clean to the bottom rung
    np.testing.assert_allclose(buf[0], np.sqrt(ab0) * x[1] + np.sqrt(1 - ab0) * -0.5, rtol=1e-6)
    # positions that dropped one rung already sit at their new ladder level: moved, untouched
    np.testing.assert_array_equal(buf[1:-1], x[2:])
    # the new last position is the fresh noise at the top level
    assert ladder[-1] == 99
    np.testing.assert_array_equal(buf[-1], fresh[0])
    with pytest.raises(ValueError, match="above the ladder"):
        advance_ladder(schedule, x, ladder, ladder, 1, fresh, noise)  # nothing denoised: levels too high after a shift


def test_streaming_refuses_more_evaluations_than_levels_between_rungs():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="evals_per_step"):
        StreamingSampler(lambda x, t, c: x, schedule, ChunkGeometry(16, 2, 2), 15, evals_per_step=7)


# -- RTI ----------------------------------------------------------------------------------

def test_shift_chunk_repeats_the_last_action():
    g = np.arange(10, dtype=np.float32).reshape(5, 2)
    np.testing.assert_array_equal(shift_chunk(g, 1), [[2, 3], [4, 5], [6, 7], [8, 9], [8, 9]])
    np.testing.assert_array_equal(shift_chunk(g, 3), [[6, 7], [8, 9], [8, 9], [8, 9], [8, 9]])


@pytest.mark.parametrize("mode", ["clip", "scale"])
def test_rti_warm_start_refinement_and_gripper(mode):
    schedule = NoiseSchedule()
    tp, to, a = 8, 2, 3
    calls = []

    def denoise(x, t, cond):  # exact eps for a point mass whose gripper value is cond[0, 0]
        mu = np.tile(np.array([0.3, -0.2, 0.0], np.float32), (1, tp, 1))
        mu[..., 2] = cond[0, 0]
        return point_mass_denoiser(schedule, mu, calls)(x, t, cond)

    s = RTISampler(denoise, schedule, ChunkGeometry(tp, to, a), refine_levels=(3, 1, 0), full_steps=10,
                   gripper_dims=(2,), gripper_mode=mode, gripper_factor=10.0, seed=0)
    close, open_ = np.array([0.8], np.float32), np.array([-0.05], np.float32)
    first = s.step(close)
    # the executed action is at To-1; the refined rest goes out as look-ahead, replanned after 1
    assert first.nfe == 10 and first.indices.tolist() == list(range(to - 1, tp)) and first.replan_after == 1
    assert np.isin(first.actions[:, 2], [-0.1 if mode == "scale" else -1.0, 0.1 if mode == "scale" else 1.0]).all()
    kept = s.guess.copy()
    if mode == "clip":
        np.testing.assert_allclose(kept[:, 2], 0.1)  # clipped to 1/factor
    else:
        np.testing.assert_allclose(kept[:, 2], 0.8, atol=1e-5)  # scale mode does not touch the chunk
    level = 0.1 if mode == "scale" else 1.0  # where the recorded open/close values sit in normalised space
    assert np.isclose(first.actions[0, 2], level)  # executed gripper is the sign
    calls.clear()
    second = s.step(close)
    assert second.nfe == 3 and [int(t[0, 0]) for _, t in calls] == [3, 1, 0]
    np.testing.assert_array_equal(calls[0][0][0], shift_chunk(kept, 1))  # refinement starts from the shifted chunk
    kept = s.guess.copy()
    calls.clear()
    s.step(close, elapsed=3)  # the robot asked late: three actions ran since the last call
    np.testing.assert_array_equal(calls[0][0][0], shift_chunk(kept, 3))
    out = s.step(open_)
    assert np.isclose(out.actions[0, 2], -level)  # a small negative target opens the gripper: the warm start does not lock it in
    np.testing.assert_allclose(out.actions[0, :2], [0.3, -0.2], atol=1e-3)
    s.reset()
    assert s.step(close).nfe == 10  # a new episode starts with a full denoise


def gaussian_denoiser(schedule: NoiseSchedule, spread: float):
    """Exact eps when clean actions are N(m, spread^2) per entry, m = cond[0, 0]: a task phase set by the observation."""
    def denoise(x, t, cond):
        m, ab = cond[0, 0], schedule.alpha_bar(t)[..., None]
        x0 = m + np.sqrt(ab) * spread ** 2 / (ab * spread ** 2 + 1 - ab) * (x - np.sqrt(ab) * m)
        return ((x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)).astype(np.float32)
    return denoise


@pytest.mark.parametrize("levels,follows", [((3, 1, 0), False), ((20, 8, 0), True), ((40, 15, 0), True)])
def test_rti_start_level_decides_whether_a_new_phase_overrules_the_warm_start(levels, follows):
    schedule = NoiseSchedule()
    s = RTISampler(gaussian_denoiser(schedule, 0.05), schedule, ChunkGeometry(16, 2, 3), levels, full_steps=10, seed=0)
    s.step(np.array([0.5], np.float32))
    np.testing.assert_allclose(s.guess.mean(), 0.5, atol=0.05)
    s.step(np.array([-0.5], np.float32))  # the observation now asks for -0.5 everywhere
    off = float(np.abs(s.guess + 0.5).max())
    assert (off < 0.1) if follows else (off > 0.25), off


def test_rti_renoise_takes_the_shifted_guess_to_the_first_level():
    schedule = NoiseSchedule()
    calls = []
    mu = np.full((1, 16, 3), 0.4, np.float32)
    s = RTISampler(point_mass_denoiser(schedule, mu, calls), schedule, ChunkGeometry(16, 2, 3), (20, 8, 0),
                   full_steps=10, renoise=True, seed=0)
    assert s.name == "rti-renoise-20,8,0"
    s.step(np.zeros(1, np.float32))
    kept = s.guess.copy()
    calls.clear()
    s.step(np.zeros(1, np.float32))
    x, t = calls[0]
    assert (t == 20).all()
    ab = schedule.alpha_bar(np.array(20))
    z = (x[0] - np.sqrt(ab) * shift_chunk(kept, 1)) / np.sqrt(1 - ab)  # the noise that was added
    assert 0.7 < z.std() < 1.3 and abs(z.mean()) < 0.3
    np.testing.assert_allclose(s.guess, kept, atol=1e-4)  # exact denoiser: back on the point mass


def test_sampler_config_parse_and_build():
    schedule = NoiseSchedule()
    trained = TrainedRegimes(horizon=16, n_obs_steps=2, n_action_steps=8, gripper_scale=10.0, gripper_dims=(6,))
    den = lambda x, t, c: np.zeros_like(x)  # noqa: E731
    assert build_sampler(SamplerConfig.parse("ddim-16"), den, schedule, 7, trained).actions_per_call == 8
    short = build_sampler(SamplerConfig.parse("ddim-10-ta2"), den, schedule, 7, trained)
    assert short.actions_per_call == 2 and short.name == "ddim-10-ta2"
    chunk = short.step(np.zeros((1, 4), np.float32))
    assert chunk.actions.shape == (2, 7)
    assert build_sampler(SamplerConfig.parse("ddpm-ta8"), den, schedule, 7, trained).name == "ddpm-100"  # the model's Ta
    for bad in ("ddim-10-ta0", "ddim-10-ta", "ddpm-tax"):
        with pytest.raises(ValueError, match="cannot parse"):
            SamplerConfig.parse(bad)
    with pytest.raises(ValueError, match="does not fit"):
        build_sampler(SamplerConfig.parse("ddim-10-ta16"), den, schedule, 7, trained)
    rti = build_sampler(SamplerConfig.parse("rti-5,2,0"), den, schedule, 7, trained)
    assert rti.refine_levels == [5, 2, 0] and rti.gripper_mode == "scale" and rti.actions_per_call == 1
    assert not rti.renoise and rti.name == "rti-5,2,0"
    for text in ("rti", "rti-renoise", "rti-renoise-40,15,0"):
        default = build_sampler(SamplerConfig.parse(text), den, schedule, 7, trained)
        assert default.refine_levels == [40, 15, 0] and default.renoise, text
    assert build_sampler(SamplerConfig.parse("rti-renoise-30,5,0"), den, schedule, 7, trained).refine_levels == [30, 5, 0]
    own = replace(trained, rti_default="rti-3,1,0")  # a package exported with --rti-default 3,1,0
    for text, name in (("rti", "rti-3,1,0"), ("rti-renoise", "rti-3,1,0"), ("rti-ta4", "rti-3,1,0-ta4"),
                       ("rti-renoise-40,15,0", "rti-renoise-40,15,0")):
        assert build_sampler(SamplerConfig.parse(text), den, schedule, 7, own).name == name, text
    assert rti_list("renoise-20,10,0", 100) == "rti-renoise-20,10,0" and rti_list("rti-3,1,0", 100) == "rti-3,1,0"
    for text, name in (("rti-ta4", "rti-renoise-40,15,0-ta4"), ("rti-3,1,0-ta2", "rti-3,1,0-ta2"),
                       ("rti-renoise-30,5,0-ta4", "rti-renoise-30,5,0-ta4")):
        ta = build_sampler(SamplerConfig.parse(text), den, schedule, 7, trained)
        assert ta.name == name and ta.actions_per_call == int(name[-1]), text
        first, later = ta.step(np.zeros((1, 4), np.float32)), ta.step(np.zeros((1, 4), np.float32))
        assert first.replan_after == later.replan_after == ta.actions_per_call
    for bad in ("rti-ta0", "rti-ta", "rti-3,1,0-tax"):
        with pytest.raises(ValueError, match="cannot parse"):
            SamplerConfig.parse(bad)
    with pytest.raises(ValueError, match="does not fit"):
        build_sampler(SamplerConfig.parse("rti-ta16"), den, schedule, 7, trained)
    st = build_sampler(SamplerConfig.parse("streaming-2"), den, schedule, 7, trained)
    assert st.n_rungs == 15 and st.evals_per_step == 2 and st.actions_per_call == 1
    with pytest.raises(ValueError, match="cannot parse"):
        SamplerConfig.parse("euler-3")


def test_sampler_lists_split_one_way_for_every_command():
    """eval, demo and bench latency read --samplers with this one rule."""
    from dpstack.runtime.samplers import split_sampler_names

    assert split_sampler_names("ddpm,ddim,rti,streaming") == ("ddpm", "ddim", "rti", "streaming")
    assert split_sampler_names("ddim-10, rti-3,1,0 ,streaming-2") == ("ddim-10", "rti-3,1,0", "streaming-2")
    assert split_sampler_names("rti-3,1,0-ta4,rti-ta2") == ("rti-3,1,0-ta4", "rti-ta2")
    assert split_sampler_names("ddim-2;rti-3,1,0;streaming-1") == ("ddim-2", "rti-3,1,0", "streaming-1")
    assert split_sampler_names("rti-renoise-20,8,0,ddim-10") == ("rti-renoise-20,8,0", "ddim-10")
    assert split_sampler_names("ddim,10") == ("ddim", "10")  # only rti takes a list; '10' is refused where it is parsed
