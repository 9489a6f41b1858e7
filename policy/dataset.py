"""The training set in memory: load a ReplayBuffer once, fit the normaliser, normalise
everything once up front, and cut windows with data.windows.SequenceWindows.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from dpstack.core.normalizer import FieldStats, Normalizer
from dpstack.core.spec import RobotSpec

from .config import ConfigError, DataConfig, PolicyConfig

ACTION = "action"


def dataset_fingerprint(arrays: Mapping[str, np.ndarray], episode_ends: np.ndarray) -> str:
    """sha256 of episode_ends, every array's key/shape/dtype and the action bytes (fast, no images)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(episode_ends, dtype=np.int64)).tobytes())
    for k in sorted(arrays):
        h.update(f"{k}:{tuple(arrays[k].shape)}:{arrays[k].dtype};".encode())
    h.update(np.ascontiguousarray(arrays[ACTION]).tobytes())
    return h.hexdigest()


def scale_gripper(stats: FieldStats, gripper_dims: tuple[int, ...], factor: float) -> FieldStats:
    """Fold RTI-DP's gripper "scale" into the action statistics: normalised gripper
    values are divided by `factor` (range [-1/f, 1/f]) and Normalizer.unnormalize undoes
    it, so a runtime that unnormalises with the shipped stats needs nothing else."""
    if factor == 1.0 or not gripper_dims:
        return stats
    div = np.ones_like(stats.scale)
    div[list(gripper_dims)] = factor
    return FieldStats(stats.kind, (stats.scale / div).astype(np.float32), (stats.offset / div).astype(np.float32),
                      stats.min, stats.max)


def resolve_obs_keys(config: PolicyConfig, spec: RobotSpec) -> tuple[str, ...]:
    """The config's obs keys, or (if empty) every low-dimensional observation of the spec."""
    keys = config.obs_keys or tuple(o.key for o in spec.observations if not o.is_image)
    missing = [k for k in keys if k not in spec.obs_keys]
    if missing:
        raise ConfigError(f"policy.obs_keys {missing} are not in the dataset; it has {spec.obs_keys}")
    return tuple(keys)


def fit_normalizer(arrays: Mapping[str, np.ndarray], obs_keys: tuple[str, ...], spec: RobotSpec,
                   config: PolicyConfig) -> Normalizer:
    image_keys = tuple(k for k in obs_keys if spec.obs(k).is_image)
    base = Normalizer.fit({k: arrays[k] for k in (*obs_keys, ACTION)}, image_keys=image_keys)
    fields = dict(base.fields)
    fields[ACTION] = scale_gripper(fields[ACTION], spec.action.gripper_dims, config.gripper_scale)
    return Normalizer(fields)


@dataclass
class TrainingData:
    arrays: dict[str, np.ndarray]       # normalised (images float16 in [-1, 1], the rest float32)
    episode_ends: np.ndarray
    spec: RobotSpec                     # restricted to the obs keys used
    normalizer: Normalizer
    fingerprint: str
    source: str

    def windows(self, config: PolicyConfig):
        from dpstack.data.windows import SequenceWindows
        return SequenceWindows(self.arrays, self.episode_ends, config.horizon, config.n_obs_steps,
                               config.n_action_steps, self.spec.obs_keys, ACTION)


def prepare(arrays: Mapping[str, np.ndarray], episode_ends: np.ndarray, spec: RobotSpec, config: PolicyConfig,
            source: str = "<memory>", normalizer: Normalizer | None = None) -> TrainingData:
    """Normalise the raw arrays once. `normalizer` reuses existing stats (resume)."""
    obs_keys = resolve_obs_keys(config, spec)
    for k in (*obs_keys, ACTION):
        if k not in arrays:
            raise ConfigError(f"dataset has no array {k!r}; have {sorted(arrays)}")
    used_spec = spec.with_observations(obs_keys)
    norm = normalizer or fit_normalizer(arrays, obs_keys, used_spec, config)
    out = {}
    for k in (*obs_keys, ACTION):
        # Images are stored as float16: exact for 8-bit levels, half the memory of float32.
        dtype = np.float16 if k != ACTION and used_spec.obs(k).is_image else np.float32
        out[k] = norm.normalize(k, arrays[k]).astype(dtype, copy=False)
    ends = np.asarray(episode_ends, dtype=np.int64)
    return TrainingData(out, ends, used_spec, norm, dataset_fingerprint(arrays, ends), source)


def dataset_attrs(rb, config: PolicyConfig, data: DataConfig | None = None):
    """The store's DatasetAttrs, or (for a store without them) attrs built from the config:
    policy.obs_keys, data.action_key and data.control_hz."""
    from dpstack.data.describe import infer_attrs
    from dpstack.data.replay_buffer import DatasetError

    data = data or DataConfig()
    if rb.attrs is not None:
        if data.control_hz and abs(data.control_hz - rb.attrs.control_hz) > 1e-6:
            raise ConfigError(f"data.control_hz {data.control_hz:g} differs from the {rb.attrs.control_hz:g} Hz "
                              f"in {rb.path}'s attrs; drop data.control_hz")
        if data.action_key not in ("action", rb.attrs.spec.action.key):
            raise ConfigError(f"data.action_key {data.action_key!r} differs from the action "
                              f"{rb.attrs.spec.action.key!r} in {rb.path}'s attrs; drop data.action_key")
        return rb.attrs
    if not data.control_hz or not config.obs_keys:
        raise ConfigError(f"{rb.path}: dataset has no dpstack attributes (task, rate, RobotSpec); name its "
                          "observation keys and rate in the config (policy.obs_keys, data.control_hz, "
                          "data.action_key), or write them into the store once with `dpstack data describe` "
                          "(docs/datasets.md, 'Bringing your own data')")
    try:
        return infer_attrs(rb, config.obs_keys, data.action_key, data.control_hz, data.task, data.robot)
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None


def load_dataset(path: str | Path, config: PolicyConfig, normalizer: Normalizer | None = None,
                 data: DataConfig | None = None) -> TrainingData:
    from dpstack.data.replay_buffer import ReplayBuffer

    with ReplayBuffer.open(path) as rb:
        spec = dataset_attrs(rb, config, data).spec
        obs_keys = resolve_obs_keys(config, spec)
        if rb.n_episodes == 0:
            raise ConfigError(f"{path}: dataset has no episodes")
        arrays = rb.load(obs_keys)
        # The policy's action is "action" whatever the store calls it.
        arrays[ACTION] = rb.load([spec.action.key])[spec.action.key]
        episode_ends = rb.episode_ends
    spec = RobotSpec(spec.task, spec.robot, spec.control_hz, spec.observations,
                     dataclasses.replace(spec.action, key=ACTION), spec.extra)
    return prepare(arrays, episode_ends, spec, config, str(path), normalizer)
