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
        ab = self._per_position(self.alpha_bar(t), x0)
        return (np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * noise).astype(x0.dtype)

    def renoise(self, x: np.ndarray, noise: np.ndarray, t_from: np.ndarray, t_to: np.ndarray) -> np.ndarray:
        """Take a sample at level t_from to the higher level t_to (q(x_to | x_from))."""
        ratio = self._per_position(self.alpha_bar(t_to) / self.alpha_bar(t_from), x)
        return (np.sqrt(ratio) * x + np.sqrt(1.0 - ratio) * noise).astype(x.dtype)

    # -- reverse process -----------------------------------------------------
    def predict_x0(self, x: np.ndarray, eps: np.ndarray, t: np.ndarray) -> np.ndarray:
        ab = self._per_position(self.alpha_bar(t), x)
        x0 = (x - np.sqrt(1.0 - ab) * eps) / np.sqrt(ab)
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        return x0

    def ddpm_step(self, x: np.ndarray, eps: np.ndarray, t: np.ndarray, t_prev: np.ndarray,
                  noise: np.ndarray | None) -> np.ndarray:
        """One ancestral step from level t to t_prev < t (t_prev = -1: clean).

        Positions where t_prev == t are left as they are.
        """
        t = np.asarray(t)
        t_prev = np.asarray(t_prev)
        ab_t = self._per_position(self.alpha_bar(t), x)
        ab_prev = self._per_position(self.alpha_bar(t_prev), x)
        x0 = self.predict_x0(x, eps, t)
        alpha_t = ab_t / ab_prev
        beta_t = 1.0 - alpha_t
        mean = (np.sqrt(ab_prev) * beta_t * x0 + np.sqrt(alpha_t) * (1.0 - ab_prev) * x) / (1.0 - ab_t)
        if noise is not None:
            var = np.clip((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20, None)
            live = self._per_position((t_prev >= 0).astype(x.dtype), x)
            mean = mean + live * np.sqrt(var) * noise
        stay = self._per_position(t_prev == t, x)
        return np.where(stay, x, mean).astype(x.dtype)

    def ddim_step(self, x: np.ndarray, eps: np.ndarray, t: np.ndarray, t_prev: np.ndarray) -> np.ndarray:
        """Deterministic (eta = 0) DDIM step from level t to t_prev."""
        ab_prev = self._per_position(self.alpha_bar(np.asarray(t_prev)), x)
        x0 = self.predict_x0(x, eps, t)
        out = np.sqrt(ab_prev) * x0 + np.sqrt(1.0 - ab_prev) * eps
        stay = self._per_position(np.asarray(t_prev) == np.asarray(t), x)
        return np.where(stay, x, out).astype(x.dtype)

    @staticmethod
    def _per_position(v: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Broadcast per-(batch, position) values over the action axis of x."""
        v = np.asarray(v, dtype=np.float64) if v.dtype != bool else np.asarray(v)
        if v.ndim == 0:
            return v
        return v[..., None]
