"""Import robomimic HDF5 demonstrations into our ReplayBuffer layout.

robomimic layout: data/demo_<i>/{obs/<key>, actions, rewards, dones}, with the
environment description as a JSON string in the `env_args` attribute of `data`.
Episodes are imported in numeric demo order (demo_2 before demo_10), the action
key becomes "action", rewards/dones become "reward"/"done". Observation keys keep
their names except "object", which robomimic renamed from robosuite's "object-state"
and which goes back to that name (the one our tasks and shipped configs use); `rename`
changes or undoes that. For the robomimic tasks whose "object" layout is known
(ROBOMIMIC_OBJECT) the stored spec names its dimensions, and its quaternions are made
sign-continuous per demo (dpstack.core.quaternion), as the simulator records them. Each demo is committed as it is written, so an interrupted
import leaves a valid dataset of the demos done so far.

Actions come in two variants. Delta actions (robomimic's default, OSC_POSE with
control_delta) are stored as they are. Absolute actions (robomimic's `actions_abs`, or
Diffusion Policy's `*_abs.hdf5` files, which keep them in `actions`) are, per arm,
position (3), axis-angle rotation (3) and gripper (1); they are stored the way Diffusion
Policy trains on them: position, rotation 6d (the first two rows of the rotation
matrix, the pytorch3d/robomimic convention) and gripper, 10 per arm.

Images are stored upright (row 0 = top of the scene), as dpstack stores every frame.
robomimic's own datasets already are: its EnvRobosuite flips robosuite's renders, which
come bottom row first, before writing them. Files that declare robosuite's
`macros_image_convention` (LIBERO and the pipelines built on it) hold frames as robosuite
rendered them under that convention, and "opengl" ones are flipped on import.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dpstack.data.describe import infer_gripper_dims
from dpstack.data.replay_buffer import DatasetAttrs, DatasetError, ReplayBuffer
from dpstack.core.quaternion import continue_episode, quaternion_layout, quaternion_slices
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec

_DEMO = re.compile(r"^demo_(\d+)$")
ACTION_SPACES = ("auto", "delta", "absolute")
# robosuite's IMAGE_CONVENTION names: "opencv" = top row first (upright), "opengl" = bottom row first.
IMAGE_CONVENTIONS = ("auto", "opencv", "opengl")
ABS_KEY = "actions_abs"   # robomimic's key for absolute actions next to the delta `actions`
ARM_IN, ARM_OUT = 7, 10  # per arm: pos + axis-angle + gripper in, pos + rotation 6d + gripper out
_RESERVED = ("action", "reward", "done")
# robomimic stores robosuite's "object-state" as "object"; dpstack's tasks publish "object-state".
DEFAULT_RENAME = {"object": "object-state"}
# robomimic's "object" vector: robosuite's object observables (name, size) in the order the
# robosuite that recorded robomimic's datasets concatenated them (pos, quat, then relative to the eef).
ROBOMIMIC_OBJECT: dict[str, tuple[tuple[str, int], ...]] = {
    "Lift": (("cube_pos", 3), ("cube_quat", 4), ("gripper_to_cube_pos", 3)),
    "PickPlaceCan": (("Can_pos", 3), ("Can_quat", 4), ("Can_to_robot0_eef_pos", 3), ("Can_to_robot0_eef_quat", 4)),
    "NutAssemblySquare": (("SquareNut_pos", 3), ("SquareNut_quat", 4), ("SquareNut_to_robot0_eef_pos", 3),
                          ("SquareNut_to_robot0_eef_quat", 4)),
}


def object_names(env_name: str, values: np.ndarray) -> tuple[str, ...]:
    """Per-dimension names of robomimic's "object" for `env_name`, () when unknown or when `values`
    (one demo's (T, D) object vector) do not fit them: wrong size, or a "quaternion" not of unit norm."""
    parts = ROBOMIMIC_OBJECT.get(env_name, ())
    names = tuple(n if size == 1 else f"{n}[{i}]" for n, size in parts for i in range(size))
    if len(names) != values.shape[-1]:
        return ()
    for sl in quaternion_slices(ArraySpec("object", (len(names),), names=names)):
        norms = np.linalg.norm(values[:, sl], axis=1)
        if not np.all((np.abs(norms - 1) < 1e-3) | (norms < 1e-6)):  # robosuite reports zeros before a pose exists
            return ()
    return names


def demo_names(data_group: Any) -> list[str]:
    """Demo group names sorted by their number, not as strings."""
    names = [n for n in data_group.keys() if _DEMO.match(n)]
    return sorted(names, key=lambda n: int(_DEMO.match(n).group(1)))


def read_env_args(data_group: Any) -> dict[str, Any]:
    raw = data_group.attrs.get("env_args")
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DatasetError(f"data.attrs['env_args']: not valid JSON ({e})") from None


def declares_absolute(env_args: Mapping[str, Any]) -> bool:
    """Whether the env's controller config takes absolute targets: robosuite < 1.5 says
    control_delta: false, 1.5's per-body-part configs may say input_type: absolute."""
    def walk(node: Any) -> bool:
        if isinstance(node, Mapping):
            if node.get("control_delta") is False or node.get("input_type") == "absolute":
                return True
            return any(walk(v) for v in node.values())
        return isinstance(node, list) and any(walk(v) for v in node)
    return walk(env_args.get("env_kwargs", {}).get("controller_configs", {}))


def choose_action_space(requested: str, src: Path, env_args: Mapping[str, Any], has_abs_key: bool) -> tuple[str, str, str]:
    """(space, the demo key to read, why) for `requested` in ACTION_SPACES."""
    if requested not in ACTION_SPACES:
        raise DatasetError(f"actions must be one of {ACTION_SPACES}, got {requested!r}")
    if requested == "delta":
        return "delta", "actions", "--actions delta"
    if requested == "absolute":
        return "absolute", ABS_KEY if has_abs_key else "actions", "--actions absolute"
    if declares_absolute(env_args):
        return "absolute", ABS_KEY if has_abs_key else "actions", "env_args: absolute controller"
    if src.name.endswith("_abs.hdf5"):  # Diffusion Policy's converted files keep the delta env_args
        return "absolute", ABS_KEY if has_abs_key else "actions", "file name *_abs.hdf5"
    return "delta", "actions", "env_args: delta controller"


def choose_image_convention(requested: str, data_group: Any) -> tuple[str, str]:
    """(the file's image convention, why) for `requested` in IMAGE_CONVENTIONS."""
    if requested not in IMAGE_CONVENTIONS:
        raise DatasetError(f"image convention must be one of {IMAGE_CONVENTIONS}, got {requested!r}")
    if requested != "auto":
        return requested, f"--image-convention {requested}"
    declared = data_group.attrs.get("macros_image_convention")
    if declared is None:
        return "opencv", "robomimic writes frames upright"
    declared = declared.decode() if isinstance(declared, bytes) else str(declared)
    if declared not in ("opencv", "opengl"):
        raise DatasetError(f"data.attrs['macros_image_convention'] is {declared!r}, expected 'opencv' or 'opengl'; "
                           "pass --image-convention")
    return declared, "data.attrs macros_image_convention"


def axis_angle_to_rotation_6d(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 6): the first two rows of the rotation matrix."""
    from scipy.spatial.transform import Rotation

    flat = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    rows = Rotation.from_rotvec(flat).as_matrix()[:, :2, :]
    return rows.reshape(*np.shape(rotvec)[:-1], 6)


def absolute_to_stored(actions: np.ndarray) -> np.ndarray:
    """(T, 7 * arms) pos + axis-angle + gripper -> (T, 10 * arms) pos + rotation 6d + gripper."""
    arms = actions.reshape(actions.shape[0], -1, ARM_IN)
    out = np.concatenate([arms[..., :3], axis_angle_to_rotation_6d(arms[..., 3:6]), arms[..., 6:]], axis=-1)
    return out.reshape(actions.shape[0], -1)


def absolute_action_names(n_arms: int) -> tuple[str, ...]:
    names = ("x", "y", "z", *(f"rot6d_{i}" for i in range(6)), "gripper")
    return names if n_arms == 1 else tuple(f"robot{a}_{n}" for a in range(n_arms) for n in names)


def _robot_name(env_kwargs: dict[str, Any]) -> str:
    robots = env_kwargs.get("robots", "unknown")
    if isinstance(robots, (list, tuple)):
        return "+".join(str(r) for r in robots) or "unknown"
    return str(robots)


def _obs_spec(key: str, ds: Any, names: tuple[str, ...] = ()) -> ArraySpec:
    """The spec of observation `key`, stored from h5py dataset `ds` (named in errors)."""
    step = tuple(ds.shape[1:])
    if ds.dtype == np.uint8:
        return ArraySpec(key, step, "uint8")
    if len(step) == 3:
        raise DatasetError(f"{ds.name}: image-shaped {step} but dtype {ds.dtype}, expected uint8")
    if np.dtype(ds.dtype).kind not in "fiub":
        raise DatasetError(f"{ds.name}: unsupported dtype {ds.dtype}")
    return ArraySpec(key, step, "float32", names=names if len(step) == 1 else ())


def stored_names(available: Sequence[str], rename: Mapping[str, str] | None) -> dict[str, str]:
    """file key -> dataset key for every key that changes name: DEFAULT_RENAME where it applies
    (its source is in the file and its target is not), then `rename`."""
    rename = dict(rename or {})
    for old, new in rename.items():
        if old not in available:
            raise DatasetError(f"--rename {old}={new}: the file has no observation {old!r} (have {list(available)})")
    names = {old: new for old, new in DEFAULT_RENAME.items() if old in available and new not in available}
    names.update(rename)
    return {old: new for old, new in names.items() if old != new}


def convert_robomimic(src: str | os.PathLike, dst: str | os.PathLike, obs_keys: Sequence[str] | None = None,
                      task: str | None = None, control_hz: float | None = None,
                      gripper_dims: Sequence[int] | None = None, overwrite: bool = False,
                      progress: bool = True, robot: str | None = None,
                      rename: Mapping[str, str] | None = None, actions: str = "auto",
                      image_convention: str = "auto") -> ReplayBuffer:
    """Convert robomimic HDF5 `src` into a new dataset at `dst`; returns it opened for appending.
    `obs_keys` may name a key as in the file or as renamed; `rename` maps file keys to stored ones.
    `actions` is "delta", "absolute" or "auto" (absolute when the env_args declare an absolute
    controller or the file is named *_abs.hdf5, as Diffusion Policy names its converted files).
    `image_convention` says which row of the file's frames is the top ("opencv": row 0, "opengl":
    the last row, flipped on import); "auto" reads the file's macros_image_convention attribute,
    and without one takes robomimic's (upright)."""
    import h5py
    from tqdm import tqdm

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    try:
        f = h5py.File(src, "r")
    except OSError as e:
        raise DatasetError(f"{src}: not a readable HDF5 file ({e})") from None
    with f:
        if "data" not in f:
            raise DatasetError(f"{src}: missing group 'data' (not a robomimic file)")
        data = f["data"]
        names = demo_names(data)
        if not names:
            raise DatasetError(f"{src}: no data/demo_<i> groups")
        env_args = read_env_args(data)
        env_kwargs = env_args.get("env_kwargs", {}) or {}

        first = data[names[0]]
        convention, convention_why = choose_image_convention(image_convention, data)
        space, action_key, why = choose_action_space(actions, src, env_args, ABS_KEY in first)
        for k in ("obs", action_key):
            if k not in first:
                raise DatasetError(f"{src}: data/{names[0]}/{k} missing")
        available = list(first["obs"].keys())
        renames = stored_names(available, rename)
        from_stored = {new: old for old, new in renames.items()}
        keys = [k if k in available else from_stored.get(k, k) for k in obs_keys] if obs_keys else available
        stored = {k: renames.get(k, k) for k in keys}
        for k in stored.values():
            if k in _RESERVED:
                raise DatasetError(f"obs key {k!r} clashes with a reserved dataset key {_RESERVED}")
        twice = sorted(k for k, n in Counter(stored.values()).items() if n > 1)
        if twice:
            raise DatasetError(f"two observations would be stored as {twice}; change --rename")
        for name in names:
            demo = data[name]
            for k in keys:
                if "obs" not in demo or k not in demo["obs"]:
                    raise DatasetError(f"data/{name}/obs/{k}: missing (have {list(demo.get('obs', {}).keys())})")
            if action_key not in demo:
                raise DatasetError(f"data/{name}/{action_key}: missing")

        task = task or env_args.get("env_name")
        if not task:
            raise DatasetError(f"{src}: env_args has no env_name; pass the task (--task)")
        hz = control_hz or env_kwargs.get("control_freq")
        if not hz:
            raise DatasetError(f"{src}: env_args.env_kwargs has no control_freq; pass the control rate (--hz)")

        all_actions = np.concatenate([np.asarray(data[n][action_key][:], dtype=np.float64) for n in names])
        if all_actions.ndim != 2:
            raise DatasetError(f"{action_key}: expected (steps, dim), got per-demo shape {first[action_key].shape}")
        if space == "absolute":
            action = _absolute_action_spec(all_actions.shape[1], action_key, gripper_dims)
        else:
            grippers = tuple(gripper_dims) if gripper_dims is not None else infer_gripper_dims(all_actions)
            # robosuite clips commands to [-1, 1]; record that range only when the data respects it.
            bounded = bool(np.all(np.abs(all_actions) <= 1.0))
            adim = all_actions.shape[1]
            action = ActionSpec(shape=(adim,), gripper_dims=grippers,
                                low=(-1.0,) * adim if bounded else (), high=(1.0,) * adim if bounded else ())
        action_info = {"space": space, "from": f"{action_key} ({why})"}
        if space == "absolute":
            action_info.update(rotation="rotation_6d", source_rotation="axis_angle")
        dim_names = {"object": object_names(str(env_args.get("env_name", "")), first["obs"]["object"][:])
                     if "object" in keys else ()}
        spec = RobotSpec(task=task, robot=robot or _robot_name(env_kwargs), control_hz=float(hz),
                         observations=tuple(_obs_spec(stored[k], first["obs"][k], dim_names.get(k, ())) for k in keys),
                         action=action)
        quaternions = quaternion_layout(spec.observations)
        flip = {k for k in keys if spec.obs(stored[k]).is_image and convention == "opengl"}
        extra = {"imported_from": src.name, "format": "robomimic", "demos": names,
                 "renamed": {k: v for k, v in stored.items() if k != v}, "actions": action_info,
                 "env_args": env_args, **({"quaternions": "sign-continuous"} if quaternions else {})}
        if any(spec.obs(stored[k]).is_image for k in keys):
            extra["images"] = {"convention_in_file": convention, "from": convention_why, "flipped": bool(flip)}
        attrs = DatasetAttrs(task=task, control_hz=float(hz), spec=spec, source="import", extra=extra)
        rb = ReplayBuffer.create(dst, attrs, overwrite=overwrite)
        for name in tqdm(names, desc=f"import {src.name}", unit="demo", disable=not progress):
            demo = data[name]
            episode = {stored[k]: np.asarray(demo["obs"][k][:]).astype(np.dtype(spec.obs(stored[k]).dtype), copy=False)
                       for k in keys}
            for k in flip:  # bottom row first in the file -> upright
                episode[stored[k]] = np.ascontiguousarray(episode[stored[k]][:, ::-1])
            raw = np.asarray(demo[action_key][:], dtype=np.float64)
            episode["action"] = (absolute_to_stored(raw) if space == "absolute" else raw).astype(np.float32)
            if "rewards" in demo:
                episode["reward"] = np.asarray(demo["rewards"][:], dtype=np.float32)
            if "dones" in demo:
                episode["done"] = np.asarray(demo["dones"][:]).astype(np.uint8)
            try:
                rb.add_episode(continue_episode(episode, quaternions))
            except DatasetError as e:
                raise DatasetError(f"data/{name}: {e}") from None
    return rb


def _absolute_action_spec(dim: int, action_key: str, gripper_dims: Sequence[int] | None) -> ActionSpec:
    if dim % ARM_IN:
        raise DatasetError(f"{action_key}: absolute actions are position + axis-angle + gripper ({ARM_IN} per arm), "
                           f"got {dim} dims; pass --actions delta if these are delta actions")
    n_arms = dim // ARM_IN
    # The gripper's place is known; inferring it could mistake a constant rotation entry for one.
    grippers = tuple(gripper_dims) if gripper_dims is not None else tuple(a * ARM_OUT + 9 for a in range(n_arms))
    return ActionSpec(shape=(n_arms * ARM_OUT,), gripper_dims=grippers, names=absolute_action_names(n_arms))
