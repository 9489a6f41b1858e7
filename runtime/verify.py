"""Torch-free checks of an exported package: random network inputs and batch self-consistency.

`dpstack export --verify` uses these when torch or the checkpoint is not at hand (a robot
computer); policy/export.py uses the same random inputs for its torch parity check.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpstack.runtime.package import PolicyPackage, SessionOptions, load_package, read_manifest, verify_files


class VerifyError(RuntimeError):
    """A package failed a check; the message says which."""


def random_observations(model_like: Any, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Observation windows (B, To, *shape) as a package's encoder takes them: low-dimensional keys
    normalised, uniform in [-1, 1]; cameras camera-like uint8 frames. For a package or a model
    (anything with .spec, .n_obs_steps and optionally .obs_keys)."""
    spec, to = model_like.spec, model_like.n_obs_steps
    keys = getattr(model_like, "obs_keys", None) or spec.obs_keys
    return {k: camera_frames(spec.obs(k).shape, (batch, to), rng) if spec.obs(k).is_image
            else rng.uniform(-1, 1, (batch, to, *spec.obs(k).shape)).astype(np.float32) for k in keys}


def camera_frames(shape: tuple[int, ...], lead: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """uint8 frames (*lead, H, W, C) with what camera frames have and noise lacks: a smooth lit
    background, a few solid objects with hard edges, sensor noise, and clipped highlights."""
    H, W, C = shape
    n = int(np.prod(lead, dtype=np.int64))
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((n, H, W, C), np.uint8)
    for i in range(n):
        corners = rng.uniform(0, 255, (4, C)).astype(np.float32)
        u, v = (xs / max(W - 1, 1))[..., None], (ys / max(H - 1, 1))[..., None]
        img = (corners[0] * (1 - u) * (1 - v) + corners[1] * u * (1 - v) + corners[2] * (1 - u) * v + corners[3] * u * v)
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
            ry, rx = rng.uniform(3, H / 3), rng.uniform(3, W / 3)
            mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1 if rng.random() < 0.5 else \
                (np.abs(ys - cy) <= ry) & (np.abs(xs - cx) <= rx)
            img[mask] = rng.uniform(0, 300, C)  # above 255: a saturated highlight
        img += rng.normal(0, 4, img.shape)
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out.reshape(*lead, H, W, C)


def random_denoiser_inputs(horizon: int, action_dim: int, cond_dim: int, num_levels: int, batch: int,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rng.standard_normal((batch, horizon, action_dim)).astype(np.float32)
    t = rng.integers(0, num_levels, (batch, horizon)).astype(np.int64)  # a different level per position
    t[0] = rng.integers(0, num_levels)  # and one sample with a single level, as full denoising uses
    cond = rng.standard_normal((batch, cond_dim)).astype(np.float32)
    return x, t, cond


def check_self_consistency(package: PolicyPackage, seed: int = 0) -> dict[str, float]:
    """Outputs finite and of the right shape, and a batch equals its samples run one by one."""
    rng = np.random.default_rng(seed)
    obs = random_observations(package, 3, rng)
    cond = package.encode(obs)
    cond_dim = int(package.manifest.get("cond_dim", cond.shape[-1]))
    if cond.shape != (3, cond_dim) or not np.all(np.isfinite(cond)):
        raise VerifyError(f"encoder output shape {cond.shape} (expected (3, {cond_dim})) or not finite")
    one = np.concatenate([package.encode({k: v[i:i + 1] for k, v in obs.items()}) for i in range(3)])
    x, t, c = random_denoiser_inputs(package.horizon, package.action_dim, cond_dim, package.schedule.num_train_steps, 3, rng)
    eps = package.denoise(x, t, c)
    if eps.shape != x.shape or not np.all(np.isfinite(eps)):
        raise VerifyError(f"denoiser output shape {eps.shape} (expected {x.shape}) or not finite")
    eps1 = np.concatenate([package.denoise(x[i:i + 1], t[i:i + 1], c[i:i + 1]) for i in range(3)])
    return {"encoder_batch_vs_single": float(np.max(np.abs(one - cond))),
            "denoiser_batch_vs_single": float(np.max(np.abs(eps1 - eps)))}


def verify_onnx_only(policy_dir: str | Path, tolerance: float = 1e-4, note: str = "") -> dict[str, Any]:
    """Hashes, loadability and batch self-consistency, without torch."""
    manifest = read_manifest(policy_dir)
    verify_files(policy_dir, manifest)
    package = load_package(policy_dir, options=SessionOptions(providers=("CPUExecutionProvider",)))
    consistency = check_self_consistency(package)
    if max(consistency.values()) >= tolerance:
        raise VerifyError(f"{policy_dir}: batched and single-sample outputs differ: {consistency}")
    report: dict[str, Any] = {"hashes": "ok", "self_consistency": consistency}
    if note:
        report["note"] = note
    return report
