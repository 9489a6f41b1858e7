"""Attach dpstack's attrs to a store that has none (Diffusion Policy's zarr, for one).

The arrays tell the shapes and dtypes; the user names what they cannot tell: which
keys are observations, which is the action, and the control rate. `infer_attrs`
builds the DatasetAttrs; `write_attrs` adds them to the store's `.zattrs` in one
atomic rename and touches nothing else. `policy.dataset` calls `infer_attrs` too,
so a store that cannot be written (a `.zarr.zip`) trains in place from a config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from dpstack.core.files import write_atomic
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.data.replay_buffer import DatasetAttrs, DatasetError, ReplayBuffer


def infer_gripper_dims(actions: np.ndarray) -> tuple[int, ...]:
    """Dimensions that only ever take the values -1 and +1 are binary gripper commands."""
    flat = actions.reshape(-1, actions.shape[-1])
    return tuple(int(d) for d in range(flat.shape[1]) if np.all(np.abs(flat[:, d]) == 1.0))


def _array_spec(rb: ReplayBuffer, key: str) -> ArraySpec:
    dtype = rb.dtype(key)
    if dtype.kind not in "fiub":
        raise DatasetError(f"data/{key}: dtype {dtype} is not numeric")
    # Floats train as float32 whatever their width; integers and images keep their dtype.
    return ArraySpec(key, rb.shape(key), "float32" if dtype.kind == "f" else dtype.name)


def infer_attrs(rb: ReplayBuffer, obs_keys: Sequence[str], action_key: str, control_hz: float,
                task: str = "", robot: str = "", gripper_dims: Sequence[int] | None = None) -> DatasetAttrs:
    """DatasetAttrs for `rb` from its arrays plus the facts the arrays cannot tell.
    Gripper dims are inferred from the action values unless given."""
    if not obs_keys:
        raise DatasetError("name the observation keys (e.g. --obs state,img)")
    missing = [k for k in (*obs_keys, action_key) if k not in rb.keys]
    if missing:
        raise DatasetError(f"{rb.path}: no array {missing[0]!r}; the store has {list(rb.keys)}")
    if action_key in obs_keys:
        raise DatasetError(f"{action_key!r} is named both as an observation and as the action")
    if not control_hz or control_hz <= 0:
        raise DatasetError("name the control rate the actions were recorded at (e.g. --hz 10)")
    if len(rb.shape(action_key)) != 1 or rb.dtype(action_key).kind != "f":
        raise DatasetError(f"data/{action_key}: the action must be a float vector per step, "
                           f"got {rb.shape(action_key)} {rb.dtype(action_key)}")
    grippers = (tuple(gripper_dims) if gripper_dims is not None
                else infer_gripper_dims(rb.load([action_key])[action_key]) if rb.n_steps else ())
    task = task or rb.path.name.split(".")[0]
    try:
        action = ActionSpec(key=action_key, shape=rb.shape(action_key), gripper_dims=grippers)
        spec = RobotSpec(task=task, robot=robot or "unknown", control_hz=float(control_hz),
                         observations=tuple(_array_spec(rb, k) for k in obs_keys), action=action)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    return DatasetAttrs(task=task, control_hz=float(control_hz), spec=spec, source="import",
                        extra={"described": {"obs": list(obs_keys), "action": action_key}})


def write_attrs(path: str | Path, attrs: DatasetAttrs, replace: bool = False) -> None:
    """Add `attrs` to the zarr-2 directory store at `path`: the store's other attrs stay, and
    `.zattrs` is replaced by one rename, so a crash leaves the old file or the new one."""
    path = Path(path)
    if path.suffix == ".zip":
        raise DatasetError(f"{path}: a .zip store is read-only; train on it in place with data.control_hz "
                           "(and policy.obs_keys) in the config, or unzip it and describe the directory")
    with ReplayBuffer.open(path) as rb:
        if rb.attrs is not None and not replace:
            raise DatasetError(f"{path}: already has dpstack attrs (task {rb.attrs.task!r}); "
                               "pass --replace to overwrite them")
        rb.check_attrs(attrs)
    if not (path / ".zgroup").is_file():
        raise DatasetError(f"{path}: not a zarr format 2 store; only format 2 stores can be described")
    zattrs = path / ".zattrs"
    old = json.loads(zattrs.read_text()) if zattrs.is_file() else {}
    write_atomic(zattrs, json.dumps({**old, **attrs.to_dict()}, indent=4, sort_keys=True))
