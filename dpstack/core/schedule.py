"""DDPM noise schedule and the single-step update rules, in numpy.

Every sampler (full DDPM/DDIM, RTI, streaming) and the training code use this
one schedule. Levels may differ per horizon position: `t` broadcasts against the
leading axes of `x` (B, Tp), and the action axis is last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


def squaredcos_cap_v2_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


BETA_SCHEDULES = {"squaredcos_cap_v2": squaredcos_cap_v2_betas, "linear": linear_betas}


@dataclass(frozen=True)
class NoiseSchedule:
    num_train_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "epsilon"
    clip_sample: bool = True
    clip_range: float = 1.0
    betas: np.ndarray = field(init=False, repr=False, compare=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; have {sorted(BETA_SCHEDULES)}")
        if self.prediction != "epsilon":
            raise ValueError(f"only epsilon prediction is supported, got {self.prediction!r}")
        betas = BETA_SCHEDULES[self.beta_schedule](self.num_train_steps)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas))

    def to_dict(self) -> dict[str, Any]:
        return {"num_train_steps": self.num_train_steps, "beta_schedule": self.beta_schedule,
                "prediction": self.prediction, "clip_sample": self.clip_sample, "clip_range": self.clip_range}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NoiseSchedule":
        return cls(**{k: d[k] for k in ("num_train_steps", "beta_schedule", "prediction", "clip_sample", "clip_range") if k in d})

    # -- levels ---------------------------------------------------------------
    def alpha_bar(self, t: np.ndarray) -> np.ndarray:
        """alpha-bar at level t; level -1 means clean (alpha-bar 1)."""
        t = np.asarray(t)
        padded = np.concatenate([[1.0], self.alphas_cumprod])
        return padded[t + 1]

    def inference_levels(self, num_steps: int) -> list[int]:
        """Descending levels for a `num_steps` sampler ("leading" spacing, ends at 0)."""
        if not 1 <= num_steps <= self.num_train_steps:
            raise ValueError(f"num_steps must be in [1, {self.num_train_steps}], got {num_steps}")
        ratio = self.num_train_steps // num_steps
        return [int(i * ratio) for i in range(num_steps)][::-1]

    # -- forward process -----------------------------------------------------
    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.renoise(x0, noise, np.full(np.shape(t), -1, dtype=np.int64), t)

    def renoise(self, x: np.ndarray, noise: np.ndarray, t_from: np.ndarray, t_to: np.ndarray) -> np.ndarray:
        """Take a sample at level t_from to the higher level t_to (q(x_to | x_from))."""
        keep, add = self._coefficients("renoise", t_from, t_to)
        return (keep * x + add * noise).astype(x.dtype)

    # -- reverse process -----------------------------------------------------
    def ddpm_step(self, x: np.ndarray, eps: np.ndarray, t: np.ndarray, t_prev: np.ndarray,
                  noise: np.ndarray | None) -> np.ndarray:
        """One ancestral step from level t to t_prev < t (t_prev = -1: clean).

        Positions where t_prev == t are left as they are.
        """
        inv_sqrt_ab, sqrt_1m_ab, c_x0, c_x, sigma, stay = self._coefficients("ddpm", t, t_prev)
        out = c_x0 * self._x0(x, eps, inv_sqrt_ab, sqrt_1m_ab) + c_x * x
        if noise is not None:
            out = out + sigma * noise
        if stay is not None:
            out = np.where(stay, x, out)
        return out.astype(x.dtype)

    def ddim_step(self, x: np.ndarray, eps: np.ndarray, t: np.ndarray, t_prev: np.ndarray) -> np.ndarray:
        """Deterministic (eta = 0) DDIM step from level t to t_prev."""
        inv_sqrt_ab, sqrt_1m_ab, c_x0, c_eps, stay = self._coefficients("ddim", t, t_prev)
        out = c_x0 * self._x0(x, eps, inv_sqrt_ab, sqrt_1m_ab) + c_eps * eps
        if stay is not None:
            out = np.where(stay, x, out)
        return out.astype(x.dtype)

    def check_descent(self, t: np.ndarray, t_next: np.ndarray) -> None:
        """Raise unless every position goes down (or stays) and no clean position is denoised."""
        self._coefficients("check", t, t_next)

    def _x0(self, x: np.ndarray, eps: np.ndarray, inv_sqrt_ab: np.ndarray, sqrt_1m_ab: np.ndarray) -> np.ndarray:
        """The clean sample the predicted noise implies (clipped like DP's sampler)."""
        x0 = (x - sqrt_1m_ab * eps) * inv_sqrt_ab
        return np.clip(x0, -self.clip_range, self.clip_range) if self.clip_sample else x0

    # -- per-level coefficients, cached: a streaming or RTI sampler asks for the same
    #    level pattern every control step, so the arithmetic on levels is done once.
    def _coefficients(self, kind: str, t: Any, t_to: Any) -> tuple:
        t = np.asarray(t, dtype=np.int64)
        t_to = np.asarray(t_to, dtype=np.int64)
        key = (kind, t.shape, t.tobytes(), t_to.shape, t_to.tobytes())
        cache = self.__dict__.setdefault("_cache", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 4096:  # many distinct level patterns (e.g. random levels in tests): start over
                cache.clear()
            hit = cache[key] = self._compute_coefficients(kind, t, t_to)
        return hit

    def _compute_coefficients(self, kind: str, t: np.ndarray, t_to: np.ndarray) -> tuple:
        def per_position(v: np.ndarray) -> np.ndarray:
            """float32, broadcast over the action axis (a scalar level covers the whole array)."""
            v = np.asarray(v)
            v = v.astype(np.float32) if v.dtype != bool else v
            return v if v.ndim == 0 else v[..., None]

        if kind == "check":
            if np.any(t_to > t):
                raise ValueError("denoise_step goes to lower levels only; use schedule.renoise to go up")
            if np.any(np.broadcast_to(t, np.broadcast_shapes(t.shape, t_to.shape))[t != t_to] < 0):
                raise ValueError("cannot denoise a clean position")
            return ()
        ab_t = self.alpha_bar(t)
        ab_to = self.alpha_bar(t_to)
        if kind == "renoise":
            ratio = ab_to / ab_t
            return per_position(np.sqrt(ratio)), per_position(np.sqrt(1.0 - ratio))
        with np.errstate(divide="ignore", invalid="ignore"):  # clean positions (t = -1) are masked by `stay`
            x0 = (per_position(1.0 / np.sqrt(ab_t)), per_position(np.sqrt(1.0 - ab_t)))
            stay_mask = np.broadcast_to(t_to == t, np.broadcast_shapes(t.shape, t_to.shape))
            stay = per_position(stay_mask) if stay_mask.any() else None
            if kind == "ddim":
                return (*x0, per_position(np.sqrt(ab_to)), per_position(np.sqrt(1.0 - ab_to)), stay)
            alpha_t = ab_t / ab_to
            beta_t = 1.0 - alpha_t
            c_x0 = np.sqrt(ab_to) * beta_t / (1.0 - ab_t)
            c_x = np.sqrt(alpha_t) * (1.0 - ab_to) / (1.0 - ab_t)
            var = np.clip((1.0 - ab_to) / (1.0 - ab_t) * beta_t, 1e-20, None)
            sigma = np.where(t_to >= 0, np.sqrt(var), 0.0)
        return (*x0, per_position(np.nan_to_num(c_x0)), per_position(np.nan_to_num(c_x)),
                per_position(np.nan_to_num(sigma)), stay)
