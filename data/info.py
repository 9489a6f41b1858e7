"""A human-readable summary of a dataset: size, keys, per-key statistics, attrs."""
from __future__ import annotations

import json

import numpy as np

from dpstack.data.replay_buffer import ReplayBuffer

MAX_DIMS_SHOWN = 10


def is_image_key(rb: ReplayBuffer, key: str) -> bool:
    """Images are stored as uint8 H x W x C per step."""
    shape = rb.shape(key)
    return len(shape) == 3 and rb.dtype(key) == np.uint8 and shape[2] in (1, 3, 4)


def _fmt(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:MAX_DIMS_SHOWN])
    return f"[{shown}{', ...' if values.size > MAX_DIMS_SHOWN else ''}]"


def key_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension min/max/mean/std of a (steps, ...) array, flattened per step."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    return {"min": flat.min(0), "max": flat.max(0), "mean": flat.mean(0), "std": flat.std(0)}


def describe(rb: ReplayBuffer, stats: bool = True) -> str:
    lines = [f"dataset   {rb.path}"]
    lengths = rb.episode_lengths()
    lines.append(f"episodes  {rb.n_episodes}")
    lines.append(f"steps     {rb.n_steps}")
    if lengths.size:
        lines.append(f"lengths   min {lengths.min()}  median {np.median(lengths):g}  mean {lengths.mean():.1f}  "
                     f"max {lengths.max()}")

    a = rb.attrs
    if a is None:
        lines.append("attrs     none (foreign dataset: supply task, rate and spec where needed)")
    else:
        s = a.spec
        lines.append(f"task      {a.task}")
        lines.append(f"rate      {a.control_hz:g} Hz")
        lines.append(f"source    {a.source}")
        lines.append(f"robot     {s.robot}")
        obs = ", ".join(f"{o.key} {o.shape} {o.dtype}" for o in s.observations)
        lines.append(f"obs spec  {obs}")
        act = f"{s.action.key} {s.action.shape} {s.action.dtype}"
        if s.action.gripper_dims:
            act += f", gripper dims {list(s.action.gripper_dims)}"
        if s.action.low:
            act += f", bounds [{min(s.action.low):g}, {max(s.action.high):g}]"
        lines.append(f"act spec  {act}")
        if a.extra:
            extra = json.dumps(a.extra, sort_keys=True)
            lines.append(f"extra     {extra if len(extra) <= 200 else extra[:197] + '...'}")

    lines.append("keys")
    width = max((len(k) for k in rb.keys), default=0)
    for k in rb.keys:
        shape, dtype = rb.shape(k), rb.dtype(k)
        kind = "image" if is_image_key(rb, k) else "low-dim"
        lines.append(f"  {k:<{width}}  {str(shape):<14} {str(dtype):<8} {kind}")
        if stats and rb.n_steps and kind == "low-dim":
            st = key_stats(rb.load([k])[k])
            dims = st["min"].size
            note = f" (first {MAX_DIMS_SHOWN} of {dims} dims)" if dims > MAX_DIMS_SHOWN else ""
            for name in ("min", "max", "mean", "std"):
                lines.append(f"  {'':<{width}}    {name:<4} {_fmt(st[name])}{note if name == 'min' else ''}")
    return "\n".join(lines)
