"""Fixed-length training windows over in-memory episode arrays.

Same semantics as Diffusion Policy's SequenceSampler: every window has length
Tp (the prediction horizon); an episode of length L yields windows starting at
t0 = -(To-1) ... L - Tp + (Ta-1), and time indices outside [0, L) repeat the
episode's first or last frame. No window crosses an episode boundary, and no
mask is needed because padded steps are real (repeated) frames.

Observation keys are cut to the first To steps of the window (all the encoder
sees); the action key keeps all Tp steps.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


class SequenceWindows:
    def __init__(self, arrays: Mapping[str, np.ndarray], episode_ends: Sequence[int] | np.ndarray,
                 horizon: int, n_obs_steps: int, n_action_steps: int, obs_keys: Iterable[str],
                 action_key: str = "action", episodes: Iterable[int] | None = None) -> None:
        """`arrays` are in-memory numpy arrays (load them up front: zarr slicing is slow).
        `episodes` restricts windows to those episode indices (e.g. a train/val split)."""
        self.horizon = int(horizon)
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.obs_keys = tuple(obs_keys)
        self.action_key = action_key
        if self.n_obs_steps < 1 or self.n_action_steps < 1:
            raise ValueError(f"n_obs_steps and n_action_steps must be >= 1, got {n_obs_steps}, {n_action_steps}")
        if self.horizon < self.n_obs_steps + self.n_action_steps - 1:
            raise ValueError(f"horizon {horizon} too short for n_obs_steps {n_obs_steps} + "
                             f"n_action_steps {n_action_steps} - 1")
        if action_key in self.obs_keys:
            raise ValueError(f"action key {action_key!r} is also listed as an observation key")

        ends = np.asarray(episode_ends, dtype=np.int64)
        n = int(ends[-1]) if ends.size else 0
        self.arrays: dict[str, np.ndarray] = {}
        for k in (*self.obs_keys, action_key):
            if k not in arrays:
                raise KeyError(f"no array {k!r}; have {sorted(arrays)}")
            a = arrays[k]
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{k}: windows index in-memory numpy arrays, got {type(a).__name__} "
                                "(use ReplayBuffer.load())")
            if a.shape[0] < n:
                raise ValueError(f"{k}: {a.shape[0]} rows but episode_ends[-1] is {n}")
            self.arrays[k] = a

        starts = np.concatenate([[0], ends[:-1]]) if ends.size else ends
        chosen = np.arange(ends.size) if episodes is None else np.asarray(sorted(set(episodes)), dtype=np.int64)
        pad_before, pad_after = self.n_obs_steps - 1, self.n_action_steps - 1
        win_start, ep_first, ep_last = [], [], []
        for e in chosen:
            s, end = int(starts[e]), int(ends[e])
            t0 = np.arange(-pad_before, (end - s) - self.horizon + pad_after + 1, dtype=np.int64)
            win_start.append(s + t0)
            ep_first.append(np.full(t0.size, s, dtype=np.int64))
            ep_last.append(np.full(t0.size, end - 1, dtype=np.int64))
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        # Per window: absolute index of its first step (may precede the episode), and
        # the episode's first/last absolute index to clamp to.
        self.window_start = cat(win_start)
        self.episode_first = cat(ep_first)
        self.episode_last = cat(ep_last)

    def __len__(self) -> int:
        return int(self.window_start.size)

    def time_indices(self, indices: np.ndarray) -> np.ndarray:
        """(B, Tp) absolute row indices of the windows, padding already applied."""
        idx = self.window_start[indices][:, None] + np.arange(self.horizon)
        return np.clip(idx, self.episode_first[indices][:, None], self.episode_last[indices][:, None])

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """key -> (B, To or Tp, ...) windows for window numbers `indices`, in one gather per key."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"window index out of range for {len(self)} windows")
        rows = self.time_indices(indices)
        out = {k: self.arrays[k][rows[:, :self.n_obs_steps]] for k in self.obs_keys}
        out[self.action_key] = self.arrays[self.action_key][rows]
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        return {k: v[0] for k, v in self.batch([i]).items()}
