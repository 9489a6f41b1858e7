"""Diffusion samplers in numpy: full DDPM/DDIM, RTI warm start, streaming ladder.

All samplers work in NORMALISED action space against a denoiser callable

    denoise(x (B, Tp, A) float32, t (B, Tp) int64, cond (B, C) float32) -> eps (B, Tp, A)

(an onnxruntime session or the torch model wrapped by policy/torch_callables.py)
and the shared `NoiseSchedule`. Levels may differ per horizon position, so one
step function serves full denoising (one level for the whole chunk) and the
streaming ladder (a level per position). Randomness comes only from the
`np.random.Generator` a sampler is given: same seed, same actions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from runtime.schedule import NoiseSchedule

Denoise = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

CLEAN = -1  # the schedule's level for a clean sample


def _as_levels(t: int | np.ndarray, batch: int, horizon: int) -> np.ndarray:
    """A level given as a scalar, (Tp,) or (B, Tp) -> (B, Tp) int64."""
    return np.broadcast_to(np.asarray(t, dtype=np.int64), (batch, horizon)).copy()


def _as_cond(cond: np.ndarray) -> np.ndarray:
    cond = np.asarray(cond, dtype=np.float32)
    return cond[None] if cond.ndim == 1 else cond


def denoise_step(denoise: Denoise, x: np.ndarray, cond: np.ndarray, schedule: NoiseSchedule,
                 t: int | np.ndarray, t_next: int | np.ndarray, rng: np.random.Generator | None,
                 method: str = "ddpm") -> np.ndarray:
    """One denoiser evaluation taking x from level t to the lower level t_next (per position).

    Positions with t == t_next are left untouched (their eps is ignored). DDPM
    draws its noise from `rng` on every call (also for the last step, where it is
    unused) so the random stream does not depend on which positions finish.
    """
    b, tp = x.shape[:2]
    t = _as_levels(t, b, tp)
    t_next = _as_levels(t_next, b, tp)
    if np.any(t_next > t):
        raise ValueError("denoise_step goes to lower levels only; use schedule.renoise to go up")
    if np.any(t[t != t_next] < 0):
        raise ValueError("cannot denoise a clean position")
    eps = np.asarray(denoise(x.astype(np.float32), t, cond), dtype=np.float32)
    if eps.shape != x.shape:
        raise ValueError(f"denoiser returned shape {eps.shape}, expected {x.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):  # finished positions (t == t_next == -1) divide by 0, then are masked
        if method == "ddpm":
            noise = rng.standard_normal(x.shape).astype(np.float32)
            return schedule.ddpm_step(x, eps, t, t_next, noise)
        if method == "ddim":
            return schedule.ddim_step(x, eps, t, t_next)
    raise ValueError(f"unknown method {method!r}; use 'ddpm' or 'ddim'")


def denoise_along(denoise: Denoise, x: np.ndarray, cond: np.ndarray, schedule: NoiseSchedule,
                  levels: Sequence[int | np.ndarray], rng: np.random.Generator | None,
                  method: str = "ddpm") -> np.ndarray:
    """Take x, currently at levels[0], down through levels[1:] and then to clean.

    One denoiser evaluation per entry of `levels`; each entry is a scalar or a
    per-position level array.
    """
    cond = _as_cond(cond)
    for i, t in enumerate(levels):
        t_next = levels[i + 1] if i + 1 < len(levels) else CLEAN
        x = denoise_step(denoise, x, cond, schedule, t, t_next, rng, method)
    return x


def sample_full(denoise: Denoise, cond: np.ndarray, schedule: NoiseSchedule, levels: Sequence[int],
                shape: tuple[int, int, int], rng: np.random.Generator, method: str = "ddpm") -> np.ndarray:
    """Full denoise of a chunk from Gaussian noise: (B, Tp, A) clean normalised actions.

    `levels` is the descending list of levels visited (schedule.inference_levels(k));
    the number of denoiser evaluations is len(levels).
    """
    levels = [int(t) for t in levels]
    if any(a <= b for a, b in zip(levels, levels[1:])) or not levels or levels[-1] < 0:
        raise ValueError(f"levels must be a non-empty strictly descending list of levels >= 0, got {levels}")
    x = rng.standard_normal(shape).astype(np.float32)
    return denoise_along(denoise, x, cond, schedule, levels, rng, method)
