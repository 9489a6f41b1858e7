"""Per-key normalisation to [-1, 1], in numpy, shared by training and the runtime.

Low-dimensional keys use per-dimension min/max (DDPM clips samples to [-1, 1],
so min/max rather than z-score); dimensions whose range is below `range_eps`
are centred instead of scaled. Images (uint8) map [0, 255] -> [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class FieldStats:
    kind: str  # "minmax" or "image"
    scale: np.ndarray
    offset: np.ndarray
    min: np.ndarray
    max: np.ndarray

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * self.scale + self.offset).astype(np.float32)

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        return ((np.asarray(y, dtype=np.float32) - self.offset) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale.tolist(), "offset": self.offset.tolist(),
                "min": self.min.tolist(), "max": self.max.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FieldStats":
        arr = {k: np.asarray(d[k], dtype=np.float32) for k in ("scale", "offset", "min", "max")}
        if not np.all(np.isfinite(arr["scale"])) or np.any(arr["scale"] == 0):
            raise ValueError("normaliser scale must be finite and non-zero")
        return cls(kind=str(d["kind"]), **arr)


def fit_minmax(x: np.ndarray, range_eps: float = 1e-4) -> FieldStats:
    """Fit stats over all leading axes of x (..., D)."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    if not np.all(np.isfinite(flat)):
        raise ValueError("cannot fit normaliser on data with NaN or Inf")
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    span = hi - lo
    flat_dims = span < range_eps
    scale = np.where(flat_dims, 1.0, 2.0 / np.where(flat_dims, 1.0, span))
    offset = np.where(flat_dims, -(lo + hi) / 2.0, -1.0 - scale * lo)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return FieldStats("minmax", f32(scale), f32(offset), f32(lo), f32(hi))


def image_stats() -> FieldStats:
    one = lambda v: np.asarray([v], dtype=np.float32)  # noqa: E731
    return FieldStats("image", one(2.0 / 255.0), one(-1.0), one(0.0), one(255.0))


@dataclass(frozen=True)
class Normalizer:
    fields: Mapping[str, FieldStats]

    @classmethod
    def fit(cls, arrays: Mapping[str, np.ndarray], image_keys: tuple[str, ...] = (), range_eps: float = 1e-4) -> "Normalizer":
        return cls({k: image_stats() if k in image_keys else fit_minmax(v, range_eps) for k, v in arrays.items()})

    def __getitem__(self, key: str) -> FieldStats:
        try:
            return self.fields[key]
        except KeyError:
            raise KeyError(f"normaliser has no statistics for {key!r}; has {sorted(self.fields)}") from None

    def normalize(self, key: str, x: np.ndarray) -> np.ndarray:
        return self[key].normalize(x)

    def unnormalize(self, key: str, y: np.ndarray) -> np.ndarray:
        return self[key].unnormalize(y)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self.fields.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalizer":
        return cls({k: FieldStats.from_dict(v) for k, v in d.items()})
