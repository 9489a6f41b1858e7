"""Per-sample noise levels for training: plain DP, the shifted SDP ladder and the
clean committed prefix (training-time real-time chunking), mixed within a batch.

Returns numpy so the draw depends only on the numpy Generator it is given.
"""
from __future__ import annotations

import numpy as np

from dpstack.core.ladder import ladder_levels, rung_gap, rungs_for_action_steps

from .config import PolicyConfig

CLEAN = -1


def n_rungs(config: PolicyConfig) -> int:
    return config.ladder_rungs or rungs_for_action_steps(config.horizon, config.n_obs_steps, config.n_action_steps)


def sample_levels(rng: np.random.Generator, batch: int, config: PolicyConfig) -> tuple[np.ndarray, np.ndarray]:
    """-> levels (B, Tp) int64 in [-1, N-1], loss mask (B, Tp) float32 (0 = not trained on)."""
    N, Tp = config.num_train_steps, config.horizon
    weights = np.array([config.regime_plain, config.regime_ladder], dtype=np.float64)
    regime = rng.choice(2, size=batch, p=weights / weights.sum())
    # Plain DP: one uniform level for the whole chunk.
    levels = np.repeat(rng.integers(0, N, size=(batch, 1)), Tp, axis=1)
    if config.regime_ladder > 0:
        h = n_rungs(config)
        shifts = rng.integers(0, rung_gap(N, h), size=batch)
        ladder = ladder_levels(Tp, config.n_obs_steps, h, N, shifts)
        levels = np.where((regime == 1)[:, None], ladder, levels)
    mask = np.ones((batch, Tp), dtype=np.float32)
    if config.prefix_prob > 0:
        d = rng.integers(1, config.prefix_max + 1, size=batch)
        d = np.where(rng.random(batch) < config.prefix_prob, d, 0)
        committed = np.arange(Tp)[None, :] < d[:, None]
        levels = np.where(committed, CLEAN, levels)
        mask[committed] = 0.0
    return levels.astype(np.int64), mask
