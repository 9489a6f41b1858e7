"""Sign-continuous quaternions: q and -q are one rotation, but a policy sees a jump.

robosuite's matrix-to-quaternion conversion switches hemisphere at some rotations, so a
quaternion observation (e.g. `SquareNut_to_robot0_eef_quat`) can flip sign between two
steps of a smooth motion. The one rule used everywhere (live env, dataset fix, import):
within an episode each quaternion is negated when its dot with the previous step's
(already continued) quaternion is negative; the first step, or a step after an all-zero
quaternion (robosuite reports zeros before its first relative pose), is canonical: its
largest-magnitude component positive. The largest component, not w, because the Panda's
gripper-down orientation has w ~ 0, where a w >= 0 rule would pick a random sign.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from dpstack.core.spec import ArraySpec

_INDEXED = re.compile(r"^(.*quat)\[(\d+)\]$")


def quaternion_slices(spec: ArraySpec) -> tuple[slice, ...]:
    """The 4-wide quaternion slices of a 1-D observation, from its names: robosuite's
    observable names (`NAME_quat[0..3]` inside object-state) or a `*_quat` key of size 4."""
    if len(spec.shape) != 1:
        return ()
    if spec.key.endswith("quat") and spec.shape == (4,):
        return (slice(0, 4),)
    out: list[slice] = []
    names = spec.names
    for start, name in enumerate(names):
        m = _INDEXED.match(name)
        if m and m.group(2) == "0" and tuple(names[start:start + 4]) == tuple(f"{m.group(1)}[{i}]" for i in range(4)):
            out.append(slice(start, start + 4))
    return tuple(out)


def quaternion_layout(observations: Sequence[ArraySpec]) -> dict[str, tuple[slice, ...]]:
    """{key: quaternion slices} for the observations that hold quaternions."""
    return {s.key: sl for s in observations if (sl := quaternion_slices(s))}


def continue_sign(q: np.ndarray, prev: np.ndarray | None = None) -> np.ndarray:
    """`q` (T, 4), a quaternion per step, made sign-continuous; `prev` is the last (continued)
    quaternion before it in the same episode, None at the episode's start."""
    q = np.asarray(q)
    out = q.copy()
    last = None if prev is None else np.asarray(prev, dtype=np.float64)
    for t in range(len(q)):
        cur = q[t].astype(np.float64)
        if last is None or not last.any():
            flip = cur[np.argmax(np.abs(cur))] < 0
        else:
            flip = float(cur @ last) < 0
        if flip:
            out[t] = -q[t]
        last = out[t].astype(np.float64)
    return out


def count_sign_flips(q: np.ndarray) -> int:
    """Steps whose quaternion has a negative dot with the previous step's (q: (T, 4))."""
    q = np.asarray(q, dtype=np.float64)
    return int(((q[1:] * q[:-1]).sum(axis=1) < 0).sum())


def continue_episode(episode: Mapping[str, np.ndarray], layout: Mapping[str, Sequence[slice]]) -> dict[str, np.ndarray]:
    """A whole episode's arrays ({key: (T, D)}) with every quaternion slice in `layout` continued."""
    out = dict(episode)
    for key, slices in layout.items():
        if key in out:
            arr = np.array(out[key], copy=True)
            for sl in slices:
                arr[:, sl] = continue_sign(arr[:, sl])
            out[key] = arr
    return out


class QuaternionContinuity:
    """The same rule step by step, for a live environment; `reset()` at every episode start."""

    def __init__(self, layout: Mapping[str, Sequence[slice]]) -> None:
        self.layout = {k: tuple(v) for k, v in layout.items()}
        self._last: dict[tuple[str, int], np.ndarray] = {}

    def reset(self) -> None:
        self._last.clear()

    def __call__(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Continue the quaternions of one step's observation `obs` ({key: (D,)}) in place."""
        for key, slices in self.layout.items():
            for i, sl in enumerate(slices):
                q = continue_sign(obs[key][sl][None], self._last.get((key, i)))[0]
                obs[key][sl] = q
                self._last[(key, i)] = q.astype(np.float64)
        return obs
