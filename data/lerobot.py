"""LeRobotDataset (Hugging Face LeRobot) import, v2.0/v2.1 and v3.0, and export to v3.0.

Parquet is read and written with pyarrow, MP4 video with PyAV; nothing of lerobot itself.

Names (LeRobot feature -> dpstack key; export maps back):
    observation.state          -> state            (observation spec)
    observation.images.<cam>   -> <cam>            (observation spec, uint8 H x W x 3)
    observation.<name>         -> <name>           (observation spec)
    action                     -> action
    next.<name>                -> <name>           (stored, not in the spec; bool becomes uint8)
    <other>                    -> <other>          (stored, not in the spec)
    timestamp, frame_index, episode_index, index, task_index: bookkeeping, not stored
    (task_index is stored when the dataset has more than one task).
Episodes come from the parquet `episode_index` column and are checked against meta's
episode lengths. Video frames are picked by time (the episode's from_timestamp plus the
row's timestamp). fps becomes control_hz, robot_type the robot. An export also writes
meta/dpstack_attrs.json (our attrs), so a round trip keeps the spec's names, gripper dims
and bounds; lerobot ignores that file.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from dpstack.core.files import staged_dir
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.data.info import is_image_key
from dpstack.data.replay_buffer import DatasetAttrs, DatasetError, ReplayBuffer
from dpstack.data.robomimic import infer_gripper_dims

BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
VERSIONS = ("v2.0", "v2.1", "v3.0")
ATTRS_FILE = "meta/dpstack_attrs.json"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
CHUNKS_SIZE = 1000  # files per chunk folder
MB = 1 << 20
# Exported video: lerobot's own defaults (AV1, CRF 30, a key frame every 2 frames for random access).
CODECS = {"av1": "libsvtav1", "h264": "libx264"}
DEFAULT_CRF = {"av1": 30, "h264": 18}


def is_lerobot_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta" / "info.json").is_file()


def dpstack_key(feature: str) -> str:
    for prefix in ("observation.images.", "observation.", "next."):
        if feature.startswith(prefix):
            return feature[len(prefix):]
    return feature


# ------------------------------------------------------------------ reading
@dataclass
class _Episode:
    index: int
    length: int
    data_file: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # feature -> (file, from_timestamp)


@dataclass
class LeRobotSource:
    """A LeRobotDataset's metadata, checked: every file an episode needs exists."""

    root: Path
    version: str
    fps: float
    robot_type: str
    features: dict[str, dict[str, Any]]
    tasks: list[str]
    episodes: list[_Episode]

    @property
    def n_frames(self) -> int:
        return sum(e.length for e in self.episodes)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not readable JSON ({e})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON lines ({e})") from None


def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None


def open_lerobot(root: str | os.PathLike) -> LeRobotSource:
    """Read and check a LeRobotDataset's meta/ (v2.0, v2.1 or v3.0)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no dataset at {root}")
    info = _read_json(root / "meta" / "info.json")
    version = info.get("codebase_version") if isinstance(info, dict) else None
    if version not in VERSIONS:
        raise DatasetError(f"{root}/meta/info.json: codebase_version {version!r}; this reader knows {VERSIONS}")
    for k in ("fps", "features", "data_path"):
        if k not in info:
            raise DatasetError(f"{root}/meta/info.json: missing {k!r}")
    features = {k: v for k, v in info["features"].items()}
    if "action" not in features:
        raise DatasetError(f"{root}: no 'action' feature (have {list(features)})")
    videos = [k for k, f in features.items() if f.get("dtype") == "video"]
    if videos and "video_path" not in info:
        raise DatasetError(f"{root}/meta/info.json: video features {videos} but no 'video_path'")
    if version == "v3.0":
        tasks, episodes = _v3_meta(root, info, videos)
    else:
        tasks, episodes = _v2_meta(root, info, videos)
    if not episodes:
        raise DatasetError(f"{root}: no episodes")
    for ep in episodes:
        files = [ep.data_file, *(p for p, _ in ep.videos.values())]
        for p in files:
            if not p.is_file():
                raise DatasetError(f"episode {ep.index}: {p.relative_to(root)} missing")
    return LeRobotSource(root, version, float(info["fps"]), str(info.get("robot_type") or "unknown"),
                         features, tasks, episodes)


def _v2_meta(root: Path, info: Mapping[str, Any], videos: Sequence[str]) -> tuple[list[str], list[_Episode]]:
    task_rows = _read_jsonl(root / "meta" / "tasks.jsonl")
    tasks = [str(r["task"]) for r in sorted(task_rows, key=lambda r: r["task_index"])]
    chunk = int(info.get("chunks_size", 1000))
    episodes = []
    for row in _read_jsonl(root / "meta" / "episodes.jsonl"):
        try:
            i, n = int(row["episode_index"]), int(row["length"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{root}/meta/episodes.jsonl: bad row {row} ({e})") from None
        ep = _Episode(i, n, root / info["data_path"].format(episode_chunk=i // chunk, episode_index=i))
        for key in videos:
            ep.videos[key] = (root / info["video_path"].format(episode_chunk=i // chunk, video_key=key,
                                                               episode_index=i), 0.0)
        episodes.append(ep)
    return tasks, sorted(episodes, key=lambda e: e.index)


def _v3_meta(root: Path, info: Mapping[str, Any], videos: Sequence[str]) -> tuple[list[str], list[_Episode]]:
    import pyarrow as pa

    t = _read_parquet(root / "meta" / "tasks.parquet").to_pydict()
    name = "task" if "task" in t else "__index_level_0__"
    if name not in t or "task_index" not in t:
        raise DatasetError(f"{root}/meta/tasks.parquet: expected columns task and task_index, got {list(t)}")
    tasks = [str(s) for _, s in sorted(zip(t["task_index"], t[name]))]
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DatasetError(f"{root}/meta/episodes: no chunk-*/file-*.parquet")
    cols = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for key in videos:
        cols += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
    try:
        rows = pa.concat_tables([_read_parquet(f, cols) for f in files]).to_pylist()
    except DatasetError as e:
        raise DatasetError(f"{e} (meta/episodes needs columns {cols})") from None
    episodes = []
    for r in rows:
        ep = _Episode(int(r["episode_index"]), int(r["length"]),
                      root / info["data_path"].format(chunk_index=r["data/chunk_index"],
                                                      file_index=r["data/file_index"]))
        for key in videos:
            path = info["video_path"].format(video_key=key, chunk_index=r[f"videos/{key}/chunk_index"],
                                             file_index=r[f"videos/{key}/file_index"])
            ep.videos[key] = (root / path, float(r[f"videos/{key}/from_timestamp"]))
        episodes.append(ep)
    return tasks, sorted(episodes, key=lambda e: e.index)


def _column(table: Any, name: str, feature: Mapping[str, Any], where: str) -> np.ndarray:
    """A (rows, *shape) array from a scalar or (nested) list column; a scalar column gives (rows,)."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    n = len(col)
    if col.null_count:
        raise DatasetError(f"{where}: column {name!r} has {col.null_count} null values")
    nested = False
    while pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        col, nested = col.flatten(), True
    values = np.asarray(col.to_numpy(zero_copy_only=False))
    if not nested:
        return values
    shape = tuple(int(s) for s in feature.get("shape", ()))
    if values.size != n * int(np.prod(shape)):
        raise DatasetError(f"{where}: column {name!r} holds {values.size // max(n, 1)} values per row, "
                           f"info.json says shape {list(shape)}")
    return values.reshape((n,) + shape)


def _decode_images(table: Any, name: str, where: str) -> np.ndarray:
    """dtype 'image' features: encoded PNG/JPEG bytes inside the parquet."""
    import imageio.v3 as iio

    try:
        frames = [iio.imread(cell["bytes"]) for cell in table.column(name).to_pylist()]
    except Exception as e:  # imageio raises several types for bad bytes
        raise DatasetError(f"{where}: column {name!r}: undecodable image ({type(e).__name__}: {e})") from None
    return _rgb(np.stack(frames))


def _rgb(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 3:
        frames = frames[..., None]
    return np.ascontiguousarray(frames.astype(np.uint8, copy=False))


class _VideoCursor:
    """Decodes one MP4 front to back and hands out the frames nearest to ascending times."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.tolerance = 0.4 / fps
        self._container = None
        self._frames: Iterator[Any] | None = None
        self._cur: tuple[float, Any] | None = None

    def _open(self) -> None:
        import av

        self.close()
        try:
            self._container = av.open(str(self.path))
            stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError) as e:
            raise DatasetError(f"{self.path}: not a readable video ({getattr(e, 'strerror', None) or e})") from None
        stream.thread_type = "AUTO"
        self._base = stream.time_base
        self._frames = self._container.decode(stream)
        self._cur = None

    def _advance(self) -> bool:
        import av

        try:
            frame = next(self._frames)
        except StopIteration:
            return False
        except av.error.FFmpegError as e:
            raise DatasetError(f"{self.path}: corrupt video ({getattr(e, 'strerror', None) or e})") from None
        self._cur = (float(frame.pts * self._base), frame)
        return True

    def frames_at(self, times: np.ndarray) -> np.ndarray:
        if self._frames is None or (self._cur is not None and times[0] < self._cur[0] - self.tolerance):
            self._open()
        out = None
        for i, t in enumerate(times):
            while self._cur is None or self._cur[0] < t - self.tolerance:
                if not self._advance():
                    raise DatasetError(f"{self.path}: no frame at t={t:.3f}s (the video ends before the data; "
                                       f"truncated or corrupt)")
            if abs(self._cur[0] - t) > self.tolerance:
                raise DatasetError(f"{self.path}: no frame at t={t:.3f}s (nearest {self._cur[0]:.3f}s)")
            img = self._cur[1].to_ndarray(format="rgb24")
            if out is None:  # filled in place: stacking a list would copy every frame again
                out = np.empty((len(times),) + img.shape, np.uint8)
            out[i] = img
        return out

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
            self._frames = None


@dataclass(frozen=True)
class _Plan:
    """Which features are read and the key each is stored as."""

    stored: dict[str, str]        # feature -> dpstack key
    observations: tuple[str, ...]  # features in the spec's order


def _plan(src: LeRobotSource, obs_keys: Sequence[str] | None, rename: Mapping[str, str],
          prior: RobotSpec | None) -> _Plan:
    usable = [k for k in src.features if k not in BOOKKEEPING and src.features[k].get("dtype") != "string"]
    names = {k: dpstack_key(k) for k in usable}
    by_name = {v: k for k, v in names.items()}
    for old, new in rename.items():
        feature = old if old in names else by_name.get(old)
        if feature is None or feature == "action":
            raise DatasetError(f"--rename {old}={new}: the dataset has no feature {old!r} (have {sorted(by_name)})")
        names[feature] = new
    obs = [k for k in usable if k.startswith("observation.")]
    if prior is not None:  # the spec's order, from a dpstack export
        order = {o.key: i for i, o in enumerate(prior.observations)}
        obs.sort(key=lambda k: order.get(dpstack_key(k), len(order)))
    if obs_keys:
        want = []
        for k in obs_keys:
            hit = [f for f in obs if k in (f, names[f], dpstack_key(f))]
            if not hit:
                raise DatasetError(f"--obs-keys {k}: no such observation (have {[names[f] for f in obs]})")
            want.append(hit[0])
        drop = set(obs) - set(want)
        obs = want
        usable = [k for k in usable if k not in drop]
    stored = {k: names[k] for k in usable}
    twice = sorted(k for k, n in Counter(stored.values()).items() if n > 1)
    if twice:
        raise DatasetError(f"two features would be stored as {twice}; change --rename")
    if stored["action"] != "action" or "action" in [stored[k] for k in stored if k != "action"]:
        raise DatasetError("only the 'action' feature can be stored as 'action'; change --rename")
    if len(src.tasks) > 1 and "task_index" in stored.values():
        raise DatasetError("a feature would be stored as 'task_index', which holds the task of each step; "
                           "change --rename")
    return _Plan(stored, tuple(obs))


def _names(feature: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[str, ...]:
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and len(shape) == 1 and len(names) == shape[0]:
        return tuple(str(n) for n in names)
    return ()


def _read_episode(src: LeRobotSource, ep: _Episode, plan: _Plan, table: Any,
                  cursors: dict[str, _VideoCursor]) -> dict[str, np.ndarray]:
    import pyarrow.compute as pc

    where = str(ep.data_file.relative_to(src.root))
    rows = table.filter(pc.equal(table.column("episode_index"), ep.index))
    if rows.num_rows != ep.length:
        raise DatasetError(f"{where}: episode {ep.index} has {rows.num_rows} rows, meta says {ep.length}")
    episode = {}
    for feature, key in plan.stored.items():
        spec = src.features[feature]
        if spec.get("dtype") == "video":
            if "timestamp" not in rows.column_names:
                raise DatasetError(f"{where}: no 'timestamp' column to align video frames with")
            path, start = ep.videos[feature]
            if path not in cursors:
                cursors[path] = _VideoCursor(path, src.fps)
            times = start + _column(rows, "timestamp", {}, where).astype(np.float64).reshape(-1)
            episode[key] = _rgb(cursors[path].frames_at(times))
        elif spec.get("dtype") == "image":
            episode[key] = _decode_images(rows, feature, where)
        else:
            value = _column(rows, feature, spec, where)
            episode[key] = value.astype(np.uint8) if value.dtype == bool else value
    if len(src.tasks) > 1:
        episode["task_index"] = _column(rows, "task_index", {}, where).astype(np.int64)
    return episode


def _check_columns(src: LeRobotSource, plan: _Plan) -> None:
    """Every data file holds the columns the plan reads (schemas only: cheap)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    need = {"episode_index"} | {f for f in plan.stored if src.features[f].get("dtype") != "video"}
    if any(src.features[f].get("dtype") == "video" for f in plan.stored):
        need.add("timestamp")
    if len(src.tasks) > 1:
        need.add("task_index")
    for path in sorted({ep.data_file for ep in src.episodes}):
        try:
            have = set(pq.read_schema(path).names)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
        if need - have:
            raise DatasetError(f"{path.relative_to(src.root)}: missing column(s) {sorted(need - have)}")


def _prior_attrs(root: Path) -> DatasetAttrs | None:
    path = root / ATTRS_FILE
    if not path.is_file():
        return None
    try:
        return DatasetAttrs.from_dict(_read_json(path))
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None


def convert_lerobot(src: str | os.PathLike, dst: str | os.PathLike, obs_keys: Sequence[str] | None = None,
                    task: str | None = None, control_hz: float | None = None,
                    gripper_dims: Sequence[int] | None = None, overwrite: bool = False,
                    progress: bool = True, robot: str | None = None,
                    rename: Mapping[str, str] | None = None) -> ReplayBuffer:
    """Import LeRobotDataset `src` into a new dataset at `dst`; returns it opened read-only.
    The dataset appears at `dst` only when every episode has been imported."""
    from tqdm import tqdm

    source = open_lerobot(src)
    prior = _prior_attrs(source.root)
    plan = _plan(source, obs_keys, dict(rename or {}), prior.spec if prior else None)
    _check_columns(source, plan)

    feats = source.features
    action_feature = feats["action"]
    if len(action_feature.get("shape", ())) != 1:
        raise DatasetError(f"action: shape {action_feature.get('shape')}, expected one dimension")
    adim = int(action_feature["shape"][0])
    if prior is not None and prior.spec.action.shape == (adim,) and gripper_dims is None:
        action = prior.spec.action
    else:
        dtype = str(action_feature.get("dtype", "float32"))
        action = ActionSpec(shape=(adim,), dtype=dtype if dtype in ("float32", "float64") else "float32",
                            names=_names(action_feature, (adim,)), gripper_dims=tuple(gripper_dims or ()))
    prior_obs = {o.key: o for o in prior.spec.observations} if prior else {}

    hz = float(control_hz or source.fps)
    name = task or (prior.task if prior else (source.tasks[0] if len(source.tasks) == 1 else source.root.name))
    extra = {"imported_from": source.root.name, "format": f"lerobot {source.version}", "tasks": source.tasks,
             "renamed": {f: k for f, k in plan.stored.items() if k != f}}

    cursors: dict[Path, _VideoCursor] = {}
    table_path, table = None, None
    actions = []
    try:
        with staged_dir(dst, overwrite=overwrite, tag="import") as tmp:
            rb = None
            for ep in tqdm(source.episodes, desc=f"import {source.root.name}", unit="episode", disable=not progress):
                if ep.data_file != table_path:
                    table_path, table = ep.data_file, _read_parquet(ep.data_file)
                episode = _read_episode(source, ep, plan, table, cursors)
                actions.append(episode["action"])
                if rb is None:  # the spec needs the decoded image shapes
                    observations = []
                    for f in plan.observations:
                        k = plan.stored[f]
                        shape, dtype = episode[k].shape[1:], episode[k].dtype
                        known = prior_obs.get(dpstack_key(f))
                        names = known.names if known is not None and known.shape == shape else _names(feats[f], shape)
                        observations.append(ArraySpec(k, shape, dtype.name, names))
                    spec = RobotSpec(task=name, robot=robot or (prior.spec.robot if prior else source.robot_type),
                                     control_hz=hz, observations=tuple(observations), action=action)
                    rb = ReplayBuffer.create(tmp, DatasetAttrs(task=name, control_hz=hz, spec=spec,
                                                               source="import", extra=extra))
                try:
                    rb.add_episode(episode)
                except DatasetError as e:
                    raise DatasetError(f"episode {ep.index}: {e}") from None
            if gripper_dims is None and prior is None:  # judged on every episode's actions
                action = ActionSpec(shape=action.shape, dtype=action.dtype, names=action.names,
                                    gripper_dims=infer_gripper_dims(np.concatenate(actions)))
                spec = RobotSpec(spec.task, spec.robot, spec.control_hz, spec.observations, action)
                rb.set_attrs(DatasetAttrs(task=name, control_hz=hz, spec=spec, source="import", extra=extra))
            rb.close()
    finally:
        for c in cursors.values():
            c.close()
    return ReplayBuffer.open(dst)


# ------------------------------------------------------------------ writing
def _stats(x: np.ndarray, image: bool) -> dict[str, np.ndarray]:
    """lerobot's per-feature statistics: per dimension, or per channel (C, 1, 1) on 0..1 for images."""
    if image:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
        shape = (x.shape[-1], 1, 1)
    else:
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        shape = (flat.shape[1],)
    st = {"min": flat.min(0), "max": flat.max(0), "mean": flat.mean(0), "std": flat.std(0)}
    st = {k: v.reshape(shape) for k, v in st.items()}
    st["count"] = np.array([x.shape[0]])
    return st


def _merge_stats(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    counts = np.array([p["count"][0] for p in parts], dtype=np.float64)
    w = (counts / counts.sum()).reshape((-1,) + (1,) * parts[0]["mean"].ndim)
    means = np.stack([p["mean"] for p in parts])
    mean = (w * means).sum(0)
    var = (w * (np.stack([p["std"] for p in parts]) ** 2 + (means - mean) ** 2)).sum(0)
    return {"min": np.min([p["min"] for p in parts], axis=0), "max": np.max([p["max"] for p in parts], axis=0),
            "mean": mean, "std": np.sqrt(var), "count": np.array([int(counts.sum())])}


def _lerobot_feature(key: str, observations: Sequence[str]) -> str:
    if key == "action":
        return "action"
    if key in ("reward", "done"):
        return f"next.{key}"
    return f"observation.{key}" if key in observations else key


def _arrow_column(x: np.ndarray) -> Any:
    import pyarrow as pa

    if x.ndim == 1:
        return pa.array(x)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1)), x.shape[1])


@contextmanager
def _keep_scheduling() -> Iterator[None]:
    """SVT-AV1 raises the calling thread to SCHED_FIFO wherever it may (as root), which every
    thread and child started later would inherit; put the caller's policy back."""
    if not hasattr(os, "sched_getscheduler"):
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, param)


class _VideoWriter:
    def __init__(self, path: Path, width: int, height: int, fps: float, codec: str, crf: int) -> None:
        import av

        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole config to stderr otherwise
        path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(path), "w")
        self._stream = self._container.add_stream(CODECS[codec], rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf), "g": "2"}
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        import av

        with _keep_scheduling():
            for img in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                frame.pts = self.frames
                self.frames += 1
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)

    def close(self) -> None:
        with _keep_scheduling():
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()


@dataclass(frozen=True)
class _ExportPlan:
    feature: dict[str, str]  # dpstack key -> LeRobot feature
    cameras: tuple[str, ...]
    lowdim: tuple[str, ...]
    tasks: tuple[str, ...]
    task_key: str | None     # a per-step task_index array from a multi-task import


def _export_plan(rb: ReplayBuffer, attrs: DatasetAttrs) -> _ExportPlan:
    if rb.n_episodes == 0:
        raise DatasetError(f"{rb.path}: no episodes to export")
    if "action" not in rb.keys:
        raise DatasetError(f"{rb.path}: no 'action' key")
    tasks = attrs.extra.get("tasks")
    task_key = "task_index" if "task_index" in rb.keys and isinstance(tasks, list) and tasks else None
    tasks = tuple(str(t) for t in tasks) if task_key else (attrs.task,)
    keys = [k for k in rb.keys if k != task_key]
    cams = tuple(k for k in keys if is_image_key(rb, k))
    for k in cams:
        h, w, c = rb.shape(k)
        if c != 3 or h % 2 or w % 2:
            raise DatasetError(f"{k}: images {h}x{w}x{c}; video export needs 3 channels and even sizes")
    lowdim = tuple(k for k in keys if k not in cams)
    for k in lowdim:
        if len(rb.shape(k)) > 1:
            raise DatasetError(f"{k}: per-step shape {rb.shape(k)}; export handles scalars, vectors and images")
        if k in BOOKKEEPING:
            raise DatasetError(f"{k}: the name of a LeRobot bookkeeping column; rename the key first")
    obs = attrs.spec.obs_keys
    feature = {k: (f"observation.images.{k}" if k in cams else _lerobot_feature(k, obs)) for k in keys}
    return _ExportPlan(feature, cams, lowdim, tasks, task_key)


def _info_features(rb: ReplayBuffer, attrs: DatasetAttrs, plan: _ExportPlan, codec: str) -> dict[str, Any]:
    spec_of = {s.key: s for s in (*attrs.spec.observations, attrs.spec.action)}
    features = {}
    for k in plan.cameras:
        h, w, c = rb.shape(k)
        features[plan.feature[k]] = {
            "dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"],
            "info": {"video.height": h, "video.width": w, "video.codec": codec, "video.pix_fmt": "yuv420p",
                     "video.is_depth_map": False, "video.fps": attrs.control_hz, "video.channels": c,
                     "has_audio": False}}
    for k in plan.lowdim:
        s = spec_of.get(k)
        features[plan.feature[k]] = {"dtype": rb.dtype(k).name, "shape": list(rb.shape(k)) or [1],
                                     "names": list(s.names) if s is not None and s.names else None}
    for k, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                     ("index", "int64"), ("task_index", "int64")):
        features[k] = {"dtype": dtype, "shape": [1], "names": None}
    return features


class _RollingFiles:
    """One stream's files (the data, or one camera's video): the next file starts once the current one
    has passed `max_mb`, checked between episodes, as lerobot does."""

    def __init__(self, root: Path, template: str, max_mb: float, open_file: Callable[[Path], Any],
                 **names: str) -> None:
        self.root, self.template, self.names = root, template, names
        self.max_bytes, self.open_file = max_mb * MB, open_file
        self.n, self.path, self.file = -1, None, None

    def current(self) -> Any:
        # a muxer creates its file with the first packet, which an encoder may still hold back
        if self.file is None or (self.path.exists() and self.path.stat().st_size >= self.max_bytes):
            self.close()
            self.n += 1
            chunk, index = self.location
            self.path = self.root / self.template.format(chunk_index=chunk, file_index=index, **self.names)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.open_file(self.path)
        return self.file

    @property
    def location(self) -> tuple[int, int]:
        return divmod(self.n, CHUNKS_SIZE)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def export_lerobot_v3(src: str | os.PathLike, out: str | os.PathLike, codec: str = "av1", crf: int | None = None,
                      overwrite: bool = False, progress: bool = True, data_file_mb: float = 100,
                      video_file_mb: float = 200) -> Path:
    """Write dpstack dataset `src` as a LeRobotDataset v3.0 at `out`, starting a new data (video) file
    after one passes `data_file_mb` (`video_file_mb`). `out` appears only when all is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if codec not in CODECS:
        raise DatasetError(f"codec {codec!r}: expected one of {sorted(CODECS)}")
    crf = DEFAULT_CRF[codec] if crf is None else int(crf)
    with ReplayBuffer.open(src) as rb:
        attrs = rb.attrs
        if attrs is None:
            raise DatasetError(f"{src}: no dpstack attrs (control rate and spec); attach them with "
                               "ReplayBuffer.set_attrs first (see docs/datasets.md)")
        plan = _export_plan(rb, attrs)
        fps, feature = attrs.control_hz, plan.feature
        with staged_dir(out, overwrite=overwrite, tag="export") as tmp:
            data = _RollingFiles(tmp, V3_DATA_PATH, data_file_mb, lambda path: pq.ParquetWriter(path, table.schema))
            videos = {k: _RollingFiles(tmp, V3_VIDEO_PATH, video_file_mb,
                                       lambda path, k=k: _VideoWriter(path, rb.shape(k)[1], rb.shape(k)[0], fps,
                                                                      codec, crf),
                                       video_key=feature[k]) for k in plan.cameras}
            episodes, stats = [], {}
            try:
                for i in tqdm(range(rb.n_episodes), desc=f"export {Path(src).name}", unit="episode",
                              disable=not progress):
                    ep, sl = rb.get_episode(i), rb.episode_slice(i)
                    T = sl.stop - sl.start
                    frame_index = np.arange(T, dtype=np.int64)
                    task_index = (ep[plan.task_key].astype(np.int64) if plan.task_key
                                  else np.zeros(T, dtype=np.int64))
                    if task_index.min() < 0 or task_index.max() >= len(plan.tasks):
                        raise DatasetError(f"episode {i}: task_index outside the {len(plan.tasks)} tasks "
                                           "in attrs extra.tasks")
                    book = {"timestamp": (frame_index / fps).astype(np.float32), "frame_index": frame_index,
                            "episode_index": np.full(T, i, dtype=np.int64),
                            "index": np.arange(sl.start, sl.stop, dtype=np.int64), "task_index": task_index}
                    table = pa.table({**{feature[k]: _arrow_column(ep[k]) for k in plan.lowdim},
                                      **{k: pa.array(v) for k, v in book.items()}})
                    data.current().write_table(table)
                    row = {"episode_index": i, "tasks": [plan.tasks[t] for t in np.unique(task_index)], "length": T,
                           "data/chunk_index": data.location[0], "data/file_index": data.location[1],
                           "dataset_from_index": sl.start, "dataset_to_index": sl.stop}
                    for k in plan.cameras:
                        video = videos[k].current()
                        start = video.frames / fps
                        video.write(ep[k])
                        row.update({f"videos/{feature[k]}/chunk_index": videos[k].location[0],
                                    f"videos/{feature[k]}/file_index": videos[k].location[1],
                                    f"videos/{feature[k]}/from_timestamp": start,
                                    f"videos/{feature[k]}/to_timestamp": video.frames / fps})
                    row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
                    ep_stats = {feature[k]: _stats(ep[k], k in plan.cameras) for k in feature}
                    ep_stats.update({k: _stats(v, False) for k, v in book.items()})
                    for f, st in ep_stats.items():
                        stats.setdefault(f, []).append(st)
                        row.update({f"stats/{f}/{s}": v.tolist() for s, v in st.items()})
                    episodes.append(row)
            finally:
                for files in (data, *videos.values()):
                    files.close()
            (tmp / V3_EPISODES_PATH).parent.mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(episodes), tmp / V3_EPISODES_PATH)
            _write_tasks(tmp / "meta" / "tasks.parquet", plan.tasks)
            merged = {f: {s: v.tolist() for s, v in _merge_stats(parts).items()} for f, parts in stats.items()}
            (tmp / "meta" / "stats.json").write_text(json.dumps(merged, indent=2))
            info = {"codebase_version": "v3.0", "robot_type": attrs.spec.robot, "total_episodes": rb.n_episodes,
                    "total_frames": rb.n_steps, "total_tasks": len(plan.tasks), "chunks_size": CHUNKS_SIZE,
                    "data_files_size_in_mb": data_file_mb, "video_files_size_in_mb": video_file_mb, "fps": fps,
                    "splits": {"train": f"0:{rb.n_episodes}"}, "data_path": V3_DATA_PATH,
                    "video_path": V3_VIDEO_PATH if plan.cameras else None,
                    "features": _info_features(rb, attrs, plan, codec)}
            (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=4))
            (tmp / ATTRS_FILE).write_text(json.dumps(attrs.to_dict(), indent=2))
    return Path(out)


def _write_tasks(path: Path, tasks: Sequence[str]) -> None:
    """meta/tasks.parquet as pandas writes it: the task string is the index, task_index a column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(list(tasks))})
    pandas_meta = {"index_columns": ["task"], "column_indexes": [],
                   "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                                "numpy_type": "int64", "metadata": None},
                               {"name": "task", "field_name": "task", "pandas_type": "unicode",
                                "numpy_type": "object", "metadata": None}],
                   "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    pq.write_table(table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), path)
