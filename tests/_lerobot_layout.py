"""Small LeRobotDatasets written to the published v2.1 and v3.0 layouts with pyarrow and PyAV,
independently of dpstack's exporter (so the importer is tested against the layout, not itself)."""
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpstack.data.lerobot import _keep_scheduling  # the encoder raises the thread to SCHED_FIFO

FPS = 10
LENGTHS = (12, 7, 9)
SIZE = 32
CAMERAS = ("top", "wrist")
STATE_NAMES = ["x", "y", "z", "gripper"]
ACTION_NAMES = ["dx", "dy", "dgrip"]


def frame(cam: int, index: int, size: int = SIZE) -> np.ndarray:
    """A smooth image with a bright square whose place depends on the global frame index (so a frame
    taken from the wrong time is caught), and a camera-specific tint."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = np.linspace(30, 200, size, dtype=np.uint8)[None, :]
    img[..., 1] = 60 + 80 * cam
    img[..., 2] = np.linspace(200, 30, size, dtype=np.uint8)[:, None]
    s = size // 4
    x = (index * 3) % (size - s)
    y = (index * 5) % (size - s)
    img[y:y + s, x:x + s] = 255
    return img


def episodes(lengths=LENGTHS, size: int = SIZE, cameras=CAMERAS):
    """Per episode: its arrays as lerobot names them (images as (T, H, W, 3))."""
    rng = np.random.default_rng(0)
    out, start = [], 0
    for i, T in enumerate(lengths):
        index = np.arange(start, start + T)
        ep = {"observation.state": rng.normal(size=(T, 4)).astype(np.float32),
              "action": rng.normal(size=(T, 3)).astype(np.float32),
              "next.done": np.arange(T) == T - 1,
              "timestamp": (np.arange(T) / FPS).astype(np.float32), "frame_index": np.arange(T),
              "episode_index": np.full(T, i), "index": index, "task_index": np.full(T, i % 2)}
        ep["action"][:, 2] = rng.choice([-1.0, 1.0], size=T)
        for c, cam in enumerate(cameras):
            ep[f"observation.images.{cam}"] = np.stack([frame(c, j, size) for j in index])
        out.append(ep)
        start += T
    return out


def _features(size: int, codec: str, cameras) -> dict:
    f = {"observation.state": {"dtype": "float32", "shape": [4], "names": STATE_NAMES},
         "action": {"dtype": "float32", "shape": [3], "names": ACTION_NAMES},
         "next.done": {"dtype": "bool", "shape": [1], "names": None}}
    for cam in cameras:
        f[f"observation.images.{cam}"] = {
            "dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": size, "video.width": size, "video.codec": codec, "video.pix_fmt": "yuv420p",
                     "video.is_depth_map": False, "video.fps": FPS, "video.channels": 3, "has_audio": False}}
    for k, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                     ("index", "int64"), ("task_index", "int64")):
        f[k] = {"dtype": dtype, "shape": [1], "names": None}
    return f


def _table(eps) -> pa.Table:
    cols = {}
    for k in ("observation.state", "action"):
        x = np.concatenate([e[k] for e in eps])
        cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    for k in ("next.done", "timestamp", "frame_index", "episode_index", "index", "task_index"):
        cols[k] = pa.array(np.concatenate([e[k] for e in eps]))
    return pa.table(cols)


def write_video(path: Path, frames: np.ndarray, codec: str) -> None:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its config to stderr otherwise
    path.parent.mkdir(parents=True, exist_ok=True)
    with _keep_scheduling(), av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"crf": "18", "g": "2"}
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


TASKS = ["pick the cube", "place the cube"]


def write_v21(root: Path, lengths=LENGTHS, size: int = SIZE, cameras=CAMERAS) -> list:
    eps = episodes(lengths, size, cameras)
    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v2.1", "robot_type": "koch", "total_episodes": len(eps),
            "total_frames": sum(lengths), "total_tasks": 2, "total_videos": len(eps) * len(cameras),
            "total_chunks": 1, "chunks_size": 1000, "fps": FPS, "splits": {"train": f"0:{len(eps)}"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": _features(size, "h264", cameras)}
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": i, "tasks": [TASKS[i % 2]], "length": T}) + "\n" for i, T in enumerate(lengths)))
    for i, ep in enumerate(eps):
        path = root / f"data/chunk-000/episode_{i:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_table([ep]), path)
        for cam in cameras:
            key = f"observation.images.{cam}"
            write_video(root / f"videos/chunk-000/{key}/episode_{i:06d}.mp4", ep[key], "libx264")
    return eps


def write_v30(root: Path, lengths=LENGTHS, size: int = SIZE, cameras=CAMERAS, codec: str = "libsvtav1") -> list:
    """Episodes 0..n-2 share data file-000, the last one is in file-001; camera 0's video is one
    file, the others put the last episode in a second file, so from_timestamp matters."""
    eps = episodes(lengths, size, cameras)
    n = len(eps)
    (root / "meta").mkdir(parents=True)
    info = {"codebase_version": "v3.0", "robot_type": "so100", "total_episodes": n, "total_frames": sum(lengths),
            "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": FPS, "splits": {"train": f"0:{n}"},
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": _features(size, "av1", cameras)}
    for ep in eps:
        ep["task_index"][:] = 0
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    pq.write_table(pa.table({"task_index": [0], "__index_level_0__": ["pick the cube"]}), root / "meta/tasks.parquet")
    data_groups = [list(range(n - 1)), [n - 1]]
    for f, group in enumerate(data_groups):
        path = root / f"data/chunk-000/file-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_table([eps[i] for i in group]), path)
    rows = [{"episode_index": i, "tasks": ["pick the cube"], "length": T, "data/chunk_index": 0,
             "data/file_index": int(i == n - 1), "dataset_from_index": int(eps[i]["index"][0]),
             "dataset_to_index": int(eps[i]["index"][-1]) + 1} for i, T in enumerate(lengths)]
    for c, cam in enumerate(cameras):
        key = f"observation.images.{cam}"
        groups = [list(range(n))] if c == 0 else data_groups
        for f, group in enumerate(groups):
            write_video(root / f"videos/{key}/chunk-000/file-{f:03d}.mp4",
                        np.concatenate([eps[i][key] for i in group]), codec)
            t = 0.0
            for i in group:
                rows[i].update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": f,
                                f"videos/{key}/from_timestamp": t, f"videos/{key}/to_timestamp": t + lengths[i] / FPS})
                t += lengths[i] / FPS
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    return eps
