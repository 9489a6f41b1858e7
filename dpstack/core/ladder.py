"""The streaming (SDP) noise ladder along the action horizon, in numpy.

ONE definition, used by training (policy/regimes.py samples shifted ladders)
and by the runtime streaming sampler (runtime/samplers.py), so the levels a
policy was trained on are exactly the levels it is served with.

Layout (Streaming Diffusion Policy): the first `n_obs_steps - 1` positions are
history (already executed) and share the lowest rung; the remaining
`horizon - n_obs_steps + 1` positions are cut into `n_rungs` chunks whose level
rises along the horizon:

    chunk c(i) = clamp((i - (To - 1)) // chunk_len, 0, n_rungs - 1)
    level k(i) = floor(N * (c + 1) / n_rungs) - 1

with chunk_len = span // n_rungs by default (SDP uses chunk_len = Ta; any
remainder joins the top rung). After each streaming call the bottom chunk is
clean, so a streaming sampler executes chunk_len actions per call. The top rung is always N - 1 (pure noise
level), the bottom rung is floor(N / n_rungs) - 1. Training shifts the whole
ladder down by j in [0, floor(N / n_rungs)) so every level between two rungs
is seen; a shift of floor(N / n_rungs) - 1 makes the bottom rung clean (0).

Example (SDP's defaults): horizon 20, To 2, 2 rungs, chunk_len 8, N 100 ->
positions 0-8 at 49, 9-19 at 99.
With Ta = 1 (`rungs_for_action_steps(Tp, To, 1)`) every position after the
history is its own rung.
"""
from __future__ import annotations

import numpy as np


def ladder_span(horizon: int, n_obs_steps: int) -> int:
    """Number of positions on the ladder proper (after the To-1 history positions)."""
    span = int(horizon) - int(n_obs_steps) + 1
    if span < 1:
        raise ValueError(f"horizon {horizon} too short for n_obs_steps {n_obs_steps}")
    return span


def rungs_for_action_steps(horizon: int, n_obs_steps: int, n_action_steps: int) -> int:
    """SDP's default rung count: one rung per executed chunk of Ta actions (at least 1)."""
    if n_action_steps < 1:
        raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
    return max(1, ladder_span(horizon, n_obs_steps) // int(n_action_steps))


def rung_gap(num_levels: int, n_rungs: int) -> int:
    """floor(N / h): levels between rungs, the shift range in training and the number
    of denoiser calls per control step in the streaming sampler."""
    if not 1 <= n_rungs <= num_levels:
        raise ValueError(f"n_rungs must be in [1, {num_levels}], got {n_rungs}")
    return int(num_levels) // int(n_rungs)


def ladder_chunk_len(horizon: int, n_obs_steps: int, n_rungs: int, chunk_len: int | None = None) -> int:
    """Positions per rung (the last rung also takes the remainder)."""
    span = ladder_span(horizon, n_obs_steps)
    if not 1 <= n_rungs <= span:
        raise ValueError(f"n_rungs must be in [1, {span}] for horizon {horizon}, n_obs_steps {n_obs_steps}; got {n_rungs}")
    if chunk_len is None:
        return span // n_rungs
    if not 1 <= chunk_len or chunk_len * n_rungs > span:
        raise ValueError(f"chunk_len {chunk_len} x {n_rungs} rungs does not fit the {span} ladder positions")
    return int(chunk_len)


def ladder_chunks(horizon: int, n_obs_steps: int, n_rungs: int, chunk_len: int | None = None) -> np.ndarray:
    """Chunk (rung) index per horizon position, shape (horizon,), int64."""
    chunk_len = ladder_chunk_len(horizon, n_obs_steps, n_rungs, chunk_len)
    pos = np.arange(horizon, dtype=np.int64) - (n_obs_steps - 1)
    return np.clip(pos // chunk_len, 0, n_rungs - 1)


def ladder_levels(horizon: int, n_obs_steps: int, n_rungs: int, num_levels: int,
                  shift: int | np.ndarray = 0, chunk_len: int | None = None) -> np.ndarray:
    """Per-position noise levels of the ladder, shifted down by `shift`.

    shift: an int (returns shape (horizon,)) or an int array of shape (B,)
    (returns (B, horizon)); each shift must lie in [0, rung_gap(num_levels, n_rungs)).
    Levels are int64 in [0, num_levels - 1].
    """
    gap = rung_gap(num_levels, n_rungs)
    chunks = ladder_chunks(horizon, n_obs_steps, n_rungs, chunk_len)
    base = (num_levels * (chunks + 1)) // n_rungs - 1
    shift = np.asarray(shift, dtype=np.int64)
    if np.any(shift < 0) or np.any(shift >= gap):
        raise ValueError(f"ladder shift must be in [0, {gap}), got {shift}")
    return (base - shift[..., None]) if shift.ndim else (base - shift)
