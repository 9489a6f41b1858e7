"""Quaternion maths in plain numpy for the bridge, the safety layer and drivers.

Convention everywhere in deploy/: quaternions are (x, y, z, w), the order
robosuite reports `robot0_eef_quat` in and franky's Affine takes. Rotation
vectors are axis * angle (UR's pose format).
"""
from __future__ import annotations

import numpy as np

IDENTITY = np.array([0.0, 0.0, 0.0, 1.0])


def normalize(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(n < 1e-12):
        raise ValueError("quaternion of zero length")
    return q / n


def conjugate(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([-q[..., :3], q[..., 3:]], axis=-1)


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b (apply b first, then a)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    av, aw = a[..., :3], a[..., 3:]
    bv, bw = b[..., :3], b[..., 3:]
    v = aw * bv + bw * av + np.cross(av, bv)
    w = aw * bw - np.sum(av * bv, axis=-1, keepdims=True)
    return np.concatenate([v, w], axis=-1)


def from_rotvec(r: np.ndarray) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    angle = np.linalg.norm(r, axis=-1, keepdims=True)
    # sin(x/2)/x -> 1/2 near 0; series avoids dividing by a tiny angle.
    small = angle < 1e-8
    safe = np.where(small, 1.0, angle)
    k = np.where(small, 0.5 - angle**2 / 48.0, np.sin(safe / 2.0) / safe)
    return np.concatenate([r * k, np.cos(angle / 2.0)], axis=-1)


def to_rotvec(q: np.ndarray) -> np.ndarray:
    """Rotation vector of the shortest rotation (angle in [0, pi])."""
    q = normalize(q)
    q = np.where(q[..., 3:] < 0, -q, q)  # pick the hemisphere with w >= 0
    v = q[..., :3]
    s = np.linalg.norm(v, axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(s, q[..., 3:])
    small = s < 1e-8
    k = np.where(small, 2.0, angle / np.where(small, 1.0, s))
    return v * k


def angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation angle (rad, in [0, pi]) taking a to b."""
    d = np.abs(np.sum(normalize(a) * normalize(b), axis=-1))
    return 2.0 * np.arccos(np.clip(d, -1.0, 1.0))


def error_rotvec(current: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-frame rotation vector e with exp(e) * current == target."""
    return to_rotvec(multiply(target, conjugate(current)))


def apply_rotvec(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Rotate orientation q by the world-frame rotation vector r."""
    return normalize(multiply(from_rotvec(r), q))


def slerp(a: np.ndarray, b: np.ndarray, s: float | np.ndarray) -> np.ndarray:
    """Spherical interpolation from a (s=0) to b (s=1) along the short arc."""
    a = normalize(a)
    b = normalize(b)
    s = np.asarray(s, dtype=np.float64)[..., None] if np.ndim(s) else float(s)
    dot = np.sum(a * b, axis=-1, keepdims=True)
    b = np.where(dot < 0, -b, b)  # q and -q are the same rotation
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin_theta = np.sin(theta)
    near = sin_theta < 1e-6
    # Nearly identical rotations: linear blend is exact to first order.
    safe = np.where(near, 1.0, sin_theta)
    wa = np.where(near, 1.0 - s, np.sin((1.0 - s) * theta) / safe)
    wb = np.where(near, s, np.sin(s * theta) / safe)
    return normalize(wa * a + wb * b)


def to_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = normalize(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def from_matrix(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i] = 0.25 * s
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
    return normalize(np.array(q))
