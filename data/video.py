"""Render an episode's camera images to an MP4 (frames are written as stored:
our datasets hold images upright)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dpstack.data.info import is_image_key
from dpstack.data.replay_buffer import DatasetError, ReplayBuffer


def image_keys(rb: ReplayBuffer) -> list[str]:
    keys = [k for k in rb.keys if is_image_key(rb, k)]
    if rb.attrs is not None:  # spec order first: that is the order cameras were declared in
        order = {o.key: i for i, o in enumerate(rb.attrs.spec.observations)}
        keys.sort(key=lambda k: order.get(k, len(order)))
    return keys


def episode_frames(rb: ReplayBuffer, episode: int, keys: Sequence[str] | None = None) -> np.ndarray:
    """(T, H, W_total, 3) uint8 frames, several cameras side by side."""
    available = image_keys(rb)
    if not available:
        raise DatasetError(f"{rb.path}: no image keys (uint8 H x W x C per step); keys are {list(rb.keys)}")
    keys = list(keys) if keys else available
    for k in keys:
        if k not in available:
            raise DatasetError(f"{k!r} is not an image key; image keys are {available}")
    ep = rb.get_episode(episode, keys=keys)
    heights = {ep[k].shape[1] for k in keys}
    if len(heights) > 1:
        raise DatasetError(f"image keys {keys} differ in height {sorted(heights)}; pick one with --key")
    frames = [ep[k] if ep[k].shape[3] == 3 else np.repeat(ep[k][..., :1], 3, axis=3) for k in keys]
    return np.concatenate(frames, axis=2)


def write_mp4(frames: np.ndarray, out: str | os.PathLike, fps: float) -> Path:
    import imageio.v2 as imageio

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # libx264 with yuv420p needs even sizes: pad by edge replication instead of resizing.
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with imageio.get_writer(out, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
    return out


def episode_video(rb: ReplayBuffer, episode: int, out: str | os.PathLike, keys: Sequence[str] | None = None,
                  fps: float | None = None) -> Path:
    frames = episode_frames(rb, episode, keys)
    if fps is None:
        fps = rb.attrs.control_hz if rb.attrs is not None else 20.0
    return write_mp4(frames, out, fps)
