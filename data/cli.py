"""`dpstack data`: inspect, convert, describe, edit and render demonstration datasets.

Heavy dependencies (zarr, h5py, imageio) are imported inside the actions so
`dpstack --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  dpstack data info out/lift.zarr
  dpstack data convert lift_ph_image.hdf5 --out lift.zarr --obs-keys robot0_eef_pos robot0_eef_quat agentview_image
  dpstack data convert koch_pick_place/ --out koch.zarr --rename top=agentview_image
  dpstack data export out/lift.zarr --format lerobot-v3 --out lift_lerobot/
  dpstack data video out/lift.zarr --episode 3 --out ep3.mp4
  dpstack data describe pusht_cchi_v7_replay.zarr --obs state,img --action action --hz 10
  dpstack data edit a.zarr b.zarr --out ab.zarr --delete 3,7:9 --val-out val.zarr --val-fraction 0.1
  dpstack data edit square.zarr --in-place --continuous-quaternions
"""

DESCRIBE_HELP = ("Name the observation keys, the action key and the control rate of a store without dpstack attrs "
                 "(e.g. Diffusion Policy's zarr); shapes and dtypes come from the arrays, gripper dims from the "
                 "action values unless given. Only the store's .zattrs changes, in one atomic rename. A .zarr.zip "
                 "is read-only: train on it in place with data.control_hz and policy.obs_keys in the config instead.")
EDIT_HELP = ("Write a new store (--out) from one or more input stores (merged in the order given, episodes "
             "numbered across them from 0): --keep and --delete choose episodes, --val-out with --val-fraction or "
             "--val-count moves a seeded random set of them into a validation store. Inputs are never modified; "
             "--in-place replaces the one input atomically (built beside it, then swapped by rename).")
GRIPPER_DIMS_HELP = "action dims that are binary gripper commands (default: inferred from the data)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="data_action", metavar="ACTION", required=True, help="one of:")

    p = sub.add_parser("info", help="print episodes, keys, shapes, per-key statistics and attrs",
                       description="Summarise a dataset (zarr directory or .zarr.zip in Diffusion Policy's "
                                   "ReplayBuffer layout): episode count and lengths, keys with shapes and dtypes, "
                                   "per-dimension min/max/mean/std of low-dimensional keys, and the dataset attrs.")
    p.add_argument("path", type=Path, help="dataset: a .zarr directory or a .zarr.zip file")
    p.add_argument("--no-stats", action="store_true", help="skip the per-key statistics (faster on big datasets)")

    p = sub.add_parser("convert", help="import a robomimic HDF5 file or a LeRobotDataset into a zarr dataset",
                       description="Import a LeRobotDataset directory (v2.0, v2.1 or v3.0: meta/info.json, parquet, "
                                   "MP4 video) or robomimic demonstrations into a new zarr dataset. LeRobot: "
                                   "observation.state becomes 'state', observation.images.<cam> '<cam>' (uint8 "
                                   "H x W x 3, decoded from the video), action 'action', fps the control rate; "
                                   "see docs/datasets.md. robomimic (data/demo_<i>/{obs/*, actions, rewards, dones}): "
                                   "Demos keep their numeric order; 'actions' becomes "
                                   "'action'; robomimic's 'object' is stored as robosuite's 'object-state' (the "
                                   "name the shipped configs use); task, control rate and robot come from the "
                                   "file's env_args. Gripper dims are the action dims that only take the values "
                                   "-1/+1 unless given.")
    p.add_argument("src", type=Path, help="robomimic .hdf5 file, or a LeRobotDataset directory")
    p.add_argument("--out", type=Path, required=True, help="destination .zarr directory (must not exist)")
    p.add_argument("--obs-keys", nargs="+", metavar="KEY", help="observation keys to keep (default: all in the file)")
    p.add_argument("--task", help="task name to record (default: env_args env_name; LeRobot: its only task)")
    p.add_argument("--hz", type=float, help="control rate in Hz (default: env_args env_kwargs control_freq; "
                                            "LeRobot: fps)")
    p.add_argument("--robot", help="robot name to record (default: env_args env_kwargs robots; LeRobot: robot_type)")
    p.add_argument("--rename", action="extend", nargs="+", default=[], metavar="OLD=NEW",
                   help="store observation OLD as NEW (default: object=object-state; "
                        "--rename object=object keeps robomimic's name; LeRobot: OLD is the feature, "
                        "e.g. observation.images.top, or its default name, e.g. top)")
    p.add_argument("--gripper-dims", type=int, nargs="*", metavar="DIM", help=GRIPPER_DIMS_HELP)
    p.add_argument("--actions", choices=("auto", "delta", "absolute"), default="auto",
                   help="delta: 'actions' as they are; absolute: 'actions_abs' (else 'actions') as position + "
                        "axis-angle + gripper, stored with the rotation as 6d (10 dims per arm); auto (default): "
                        "absolute when env_args declare an absolute controller or the file is *_abs.hdf5")
    p.add_argument("--image-convention", choices=("auto", "opencv", "opengl"), default="auto",
                   help="robomimic: which row of the file's frames is the top, in robosuite's names: opencv = row 0, "
                        "opengl = the last row (flipped on import, frames are stored upright); auto (default): the "
                        "file's macros_image_convention attribute (LIBERO writes it), else robomimic's (upright)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("export", help="write a zarr dataset as a LeRobotDataset v3.0",
                       description="Write a dataset as a LeRobotDataset v3.0 directory (meta/info.json, stats.json, "
                                   "tasks.parquet, episodes/, data parquet, an MP4 per camera) that lerobot's "
                                   "tools read. Image keys become observation.images.<key>, observation keys "
                                   "observation.<key>, reward/done next.reward/next.done. Video is lossy.")
    p.add_argument("path", type=Path, help="dataset: a .zarr directory or a .zarr.zip file")
    p.add_argument("--format", default="lerobot-v3", choices=["lerobot-v3"],
                   help="output format (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="destination directory (must not exist)")
    p.add_argument("--codec", default="av1", choices=["av1", "h264"], help="video codec (default: av1, as lerobot)")
    p.add_argument("--crf", type=int, help="video quality, lower is better (default: 30 for av1, 18 for h264)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("describe", help="write dpstack's attrs into a store that has none (Diffusion Policy zarr)",
                       description=DESCRIBE_HELP)
    p.add_argument("path", type=Path, help="dataset: a zarr directory store")
    p.add_argument("--obs", required=True, help="observation keys, comma-separated (e.g. state,img)")
    p.add_argument("--action", default="action", help="the action key (default: action)")
    p.add_argument("--hz", type=float, required=True, help="control rate the actions were recorded at")
    p.add_argument("--task", default="", help="task name (default: the store's name)")
    p.add_argument("--robot", default="", help="robot name (default: unknown)")
    p.add_argument("--gripper-dims", type=int, nargs="*", metavar="DIM", help=GRIPPER_DIMS_HELP)
    p.add_argument("--replace", action="store_true", help="replace dpstack attrs the store already has")

    p = sub.add_parser("edit", help="delete episodes, keep a range, merge stores, split off a validation set",
                       description=EDIT_HELP)
    p.add_argument("inputs", type=Path, nargs="+", metavar="STORE", help="input stores (merged stores need the same spec)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="new store to write (must not exist)")
    where.add_argument("--in-place", action="store_true", help="replace the input store with the result")
    p.add_argument("--delete", default="", metavar="EPISODES", help="episodes to drop, e.g. 3,5,7:10 (stop excluded)")
    p.add_argument("--keep", metavar="START:STOP", help="keep only episodes START..STOP-1, e.g. 0:50 or 10:")
    p.add_argument("--val-out", type=Path, help="validation store to write (must not exist)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, help="fraction of the chosen episodes to move into --val-out")
    val.add_argument("--val-count", type=int, help="number of the chosen episodes to move into --val-out")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default: 0)")
    p.add_argument("--continuous-quaternions", action="store_true",
                   help="negate quaternion observations where they flip sign between steps (q and -q are one "
                        "rotation), as the simulator now records them; prints the flips before and after")

    p = sub.add_parser("video", help="write an episode's camera images to an MP4",
                       description="Render one episode's image keys (uint8 H x W x C per step) to an MP4. "
                                   "With several image keys, cameras are shown side by side.")
    p.add_argument("path", type=Path, help="dataset: a .zarr directory or a .zarr.zip file")
    p.add_argument("--episode", type=int, required=True, help="episode index (negative counts from the end)")
    p.add_argument("--key", action="extend", nargs="+", metavar="KEY",
                   help="image key(s) to show, left to right (default: every image key)")
    p.add_argument("--out", type=Path, help="output .mp4 (default: <dataset name>_ep<N>.mp4 here)")
    p.add_argument("--fps", type=float, help="frames per second (default: the dataset's control rate, else 20)")


def run(args: argparse.Namespace) -> int:
    from dpstack.data.replay_buffer import DatasetError

    action = {"info": _info, "convert": _convert, "export": _export, "video": _video, "describe": _describe,
              "edit": _edit}[args.data_action]
    try:
        return action(args)
    except (DatasetError, FileNotFoundError, FileExistsError, IndexError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"dpstack data {args.data_action}: error: {msg}", file=sys.stderr)
        return 2


def _info(args: argparse.Namespace) -> int:
    from dpstack.data.info import describe
    from dpstack.data.replay_buffer import ReplayBuffer

    with ReplayBuffer.open(args.path) as rb:
        print(describe(rb, stats=not args.no_stats))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dpstack.data.lerobot import convert_lerobot, is_lerobot_dataset
    from dpstack.data.replay_buffer import DatasetError
    from dpstack.data.robomimic import convert_robomimic

    rename = {}
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not (sep and old and new):
            raise DatasetError(f"--rename {item}: expected OLD=NEW, e.g. --rename object=object-state")
        rename[old] = new
    if args.src.is_dir() and not is_lerobot_dataset(args.src):
        raise DatasetError(f"{args.src}: a directory without meta/info.json; convert reads a LeRobotDataset "
                           "directory or a robomimic .hdf5 file")
    lerobot = args.src.is_dir()
    if lerobot and args.actions != "auto":
        raise DatasetError("--actions is for robomimic files; a LeRobotDataset's action is imported as it is")
    if lerobot and args.image_convention != "auto":
        raise DatasetError("--image-convention is for robomimic files; a LeRobotDataset's video frames are upright")
    try:
        if lerobot:
            rb = convert_lerobot(args.src, args.out, obs_keys=args.obs_keys, task=args.task, control_hz=args.hz,
                                 gripper_dims=args.gripper_dims, overwrite=args.overwrite, robot=args.robot,
                                 rename=rename)
        else:
            rb = convert_robomimic(args.src, args.out, obs_keys=args.obs_keys, task=args.task, control_hz=args.hz,
                                   gripper_dims=args.gripper_dims, overwrite=args.overwrite, robot=args.robot,
                                   rename=rename, actions=args.actions, image_convention=args.image_convention)
    except FileExistsError:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it") from None
    space = rb.attrs.extra.get("actions", {}).get("space")
    print(f"wrote {rb.n_episodes} episodes, {rb.n_steps} steps, keys {list(rb.keys)}, "
          f"{f'{space} actions' if space else 'action'} {rb.attrs.spec.action.shape} to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dpstack.data.lerobot import export_lerobot_v3

    try:
        out = export_lerobot_v3(args.path, args.out, codec=args.codec, crf=args.crf, overwrite=args.overwrite)
    except FileExistsError:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it") from None
    print(f"wrote {out} (LeRobotDataset v3.0)")
    return 0


def _describe(args: argparse.Namespace) -> int:
    from dpstack.data.describe import infer_attrs, write_attrs
    from dpstack.data.replay_buffer import ReplayBuffer

    obs = [k.strip() for k in args.obs.split(",") if k.strip()]
    with ReplayBuffer.open(args.path) as rb:
        attrs = infer_attrs(rb, obs, args.action, args.hz, args.task, args.robot, args.gripper_dims)
    write_attrs(args.path, attrs, replace=args.replace)
    s = attrs.spec
    print(f"described {args.path}: task {s.task}, {s.control_hz:g} Hz, obs "
          f"{', '.join(f'{o.key} {o.shape}' for o in s.observations)}, action {s.action.key} {s.action.shape}"
          f"{f' gripper dims {list(s.action.gripper_dims)}' if s.action.gripper_dims else ''}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    from dpstack.data.edit import edit, parse_episodes, parse_range

    result = edit(args.inputs, args.out, in_place=args.in_place,
                  delete=parse_episodes(args.delete) if args.delete else (),
                  keep=parse_range(args.keep) if args.keep else None, val_out=args.val_out,
                  val_fraction=args.val_fraction, val_count=args.val_count, seed=args.seed,
                  continuous_quaternions=args.continuous_quaternions)
    print(f"wrote {result.n_episodes} episodes ({result.n_steps} steps) to {result.out}"
          + (f", {result.val_episodes} to {result.val_out}" if result.val_out else ""))
    if result.quaternion_flips is not None:
        before, after = result.quaternion_flips
        print(f"quaternion sign flips: {before} before, {after} after")
    return 0


def _video(args: argparse.Namespace) -> int:
    from dpstack.data.replay_buffer import ReplayBuffer
    from dpstack.data.video import episode_video

    with ReplayBuffer.open(args.path) as rb:
        name = args.path.name.split(".")[0]
        out = args.out or Path(f"{name}_ep{args.episode}.mp4")
        path = episode_video(rb, args.episode, out, keys=args.key, fps=args.fps)
    print(f"wrote {path}")
    return 0
