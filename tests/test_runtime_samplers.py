"""Sampler math checked against denoisers whose exact answer is known in closed form."""
import numpy as np
import pytest

from runtime.samplers import sample_full
from runtime.schedule import NoiseSchedule


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
