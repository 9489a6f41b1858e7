"""Demonstration datasets in Diffusion Policy's ReplayBuffer layout.

Layout (zarr format 2, so Diffusion Policy's own zarr-2 code opens our files):

    /data/<key>          per-step arrays, all episodes concatenated along axis 0
    /meta/episode_ends   int64 cumulative episode ends (episode i = [ends[i-1], ends[i]))
    /.zattrs             our DatasetAttrs as plain JSON (absent in foreign datasets)

Crash safety. `add_episode` first grows and fills every data array, then commits
the episode by extending meta/episode_ends. Every file is replaced atomically
(zarr's LocalStore writes temp-then-rename, and so does our own commit), and the
commit writes the new episode_ends chunk *before* the metadata that grows the
array's shape, so a reader sees either the old or the new episode list, never
a half-written one. Rows past episode_ends[-1] belong to an episode that never
committed: reading ignores them, opening with mode="a" truncates them, both warn.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from dpstack.core.files import write_atomic
from dpstack.core.spec import RobotSpec

SOURCES = ("scripted_expert", "human", "import")
ATTRS_VERSION = 1
# episode_ends is tiny; a fixed chunk keeps each commit to one chunk file + .zarray.
EPISODE_ENDS_CHUNK = 4096
# Target uncompressed bytes per data chunk (along time).
DATA_CHUNK_BYTES = 2 << 20
# Images (H x W x C arrays): ~1 MiB chunks (49 frames at 84 x 84 x 3), whole-chunk zstd.
# Measured on collected Lift frames (docs/datasets.md, "Storage"): 5.4x smaller than raw,
# about twice lz4's ratio, and a To=2 window decompresses one small chunk.
IMAGE_CHUNK_BYTES = 1 << 20
IMAGE_ZSTD_LEVEL = 3

# Test hook: called with a stage name between the steps of add_episode, so a
# test can stop (and SIGKILL) a writer at a precise point. None in normal use.
_stage_hook: Callable[[str], None] | None = None


class DatasetError(ValueError):
    """A dataset is missing, malformed or corrupt; the message names the key."""


class PartialEpisodeWarning(UserWarning):
    """An episode that was being written when the writer died was dropped."""


@dataclass
class DatasetAttrs:
    """What a policy needs to know about a dataset besides its arrays."""

    task: str
    control_hz: float
    spec: RobotSpec
    source: str  # "scripted_expert" | "human" | "import"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        self.control_hz = float(self.control_hz)
        if abs(self.control_hz - self.spec.control_hz) > 1e-6:
            raise ValueError(f"control_hz {self.control_hz} differs from the spec's {self.spec.control_hz}")

    def to_dict(self) -> dict[str, Any]:
        return {"dpstack_version": ATTRS_VERSION, "task": self.task, "control_hz": self.control_hz,
                "source": self.source, "spec": self.spec.to_dict(), "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DatasetAttrs":
        try:
            return cls(task=str(d["task"]), control_hz=float(d["control_hz"]),
                       spec=RobotSpec.from_dict(d["spec"]), source=str(d["source"]),
                       extra=dict(d.get("extra", {})))
        except KeyError as e:
            raise DatasetError(f"dataset attrs: missing field {e}") from None
        except (TypeError, ValueError) as e:
            raise DatasetError(f"dataset attrs: {e}") from None


def _is_zip(path: Path) -> bool:
    return path.suffix == ".zip"


def is_image_shape(step_shape: tuple[int, ...]) -> bool:
    return len(step_shape) == 3


def _time_chunk(step_shape: tuple[int, ...], dtype: np.dtype) -> int:
    step_bytes = max(1, int(np.prod(step_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    target = IMAGE_CHUNK_BYTES if is_image_shape(step_shape) else DATA_CHUNK_BYTES
    return int(max(1, min(4096, target // step_bytes)))


def _compressor(step_shape: tuple[int, ...]) -> Any:
    import numcodecs

    # Images: one zstd frame per chunk, so similar consecutive frames compress against each
    # other (Blosc splits a chunk into blocks and loses that). Low-dim floats: zstd + byte shuffle.
    if is_image_shape(step_shape):
        return numcodecs.Zstd(level=IMAGE_ZSTD_LEVEL)
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


def _stage(name: str) -> None:
    if _stage_hook is not None:
        _stage_hook(name)


class ReplayBuffer:
    """A dataset of episodes. Use `create` or `open`, not the constructor."""

    def __init__(self, path: Path, root: Any, store: Any, mode: str) -> None:
        self.path = path
        self.mode = mode
        self._root = root
        self._store = store
        self._episode_ends = np.zeros(0, dtype=np.int64)
        self._arrays: dict[str, Any] = {}
        self._attrs: DatasetAttrs | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | os.PathLike, attrs: DatasetAttrs | None, *, overwrite: bool = False) -> "ReplayBuffer":
        """Create a new, empty directory store at `path` and open it for appending
        (attrs None: a store without dpstack attrs, like a foreign one)."""
        import zarr

        path = Path(path)
        if _is_zip(path):
            raise DatasetError(f"{path}: cannot write a .zip store; create a directory and zip it afterwards")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        store = zarr.storage.LocalStore(path)
        root = zarr.open_group(store, mode="w", zarr_format=2)
        root.create_group("data")
        meta = root.create_group("meta")
        meta.create_array(name="episode_ends", shape=(0,), chunks=(EPISODE_ENDS_CHUNK,), dtype=np.int64,
                          compressors=None, fill_value=0)
        if attrs is not None:
            root.attrs.put(attrs.to_dict())
        rb = cls(path, root, store, "a")
        rb._attrs = attrs
        return rb

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "ReplayBuffer":
        """Open a directory or .zarr.zip store ("r") or a directory store for appending ("a")."""
        import zarr

        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not path.exists():
            raise FileNotFoundError(f"no dataset at {path}")
        if _is_zip(path):
            if mode != "r":
                raise DatasetError(f"{path}: .zip stores are read-only; unzip to a directory to append")
            store = zarr.storage.ZipStore(path, mode="r")
        else:
            store = zarr.storage.LocalStore(path, read_only=(mode == "r"))
        try:
            root = zarr.open_group(store, mode="r" if mode == "r" else "r+")
        except Exception as e:  # zarr raises several types for a non-store path
            raise DatasetError(f"{path}: not a zarr group ({type(e).__name__}: {e})") from None
        rb = cls(path, root, store, mode)
        rb._load_structure()
        return rb

    def _load_structure(self) -> None:
        root = self._root
        for name in ("data", "meta"):
            if name not in root or not _is_group(root[name]):
                raise DatasetError(f"{self.path}: missing group {name!r} (not a ReplayBuffer layout)")
        if "episode_ends" not in root["meta"]:
            raise DatasetError(f"{self.path}: missing meta/episode_ends")
        if self.mode == "a" and not (self.path / "meta" / "episode_ends" / ".zarray").is_file():
            # Appends commit by rewriting episode_ends' v2 metadata by hand; refuse before writing anything.
            raise DatasetError("meta/episode_ends: not a zarr format 2 array; this store can be read, not appended to")
        ends_arr = root["meta"]["episode_ends"]
        if np.dtype(ends_arr.dtype).kind not in "iu" or ends_arr.ndim != 1:
            raise DatasetError(f"meta/episode_ends: expected a 1-D integer array, got {ends_arr.ndim}-D {ends_arr.dtype}")
        try:
            ends = np.asarray(ends_arr[:], dtype=np.int64)
        except Exception as e:
            raise DatasetError(f"meta/episode_ends: unreadable ({type(e).__name__}: {e})") from None
        if ends.size:
            if ends[0] <= 0:
                raise DatasetError(f"meta/episode_ends: first end is {ends[0]}, expected > 0")
            bad = np.nonzero(np.diff(ends) <= 0)[0]
            if bad.size:
                i = int(bad[0]) + 1
                raise DatasetError(f"meta/episode_ends: not strictly increasing at index {i} "
                                   f"({ends[i - 1]} then {ends[i]})")
        self._episode_ends = ends
        n = int(ends[-1]) if ends.size else 0

        arrays = {}
        for name, member in root["data"].members():
            if _is_group(member):
                raise DatasetError(f"data/{name}: is a group, expected a per-step array")
            if member.ndim < 1:
                raise DatasetError(f"data/{name}: 0-D array, expected (steps, ...)")
            if member.shape[0] < n:
                raise DatasetError(f"data/{name}: has {member.shape[0]} rows but meta/episode_ends[-1] is {n}")
            arrays[name] = member
        if n and not arrays:
            raise DatasetError(f"{self.path}: meta/episode_ends lists {n} steps but data/ holds no arrays")
        self._arrays = dict(sorted(arrays.items()))

        tails = {k: a.shape[0] - n for k, a in self._arrays.items() if a.shape[0] > n}
        if tails:
            what = "truncated" if self.mode == "a" else "ignored"
            warnings.warn(PartialEpisodeWarning(
                f"{self.path}: dropping a partial episode that never committed ({what} rows past step {n} "
                f"in {', '.join(f'data/{k} (+{t})' for k, t in tails.items())})"), stacklevel=3)
            if self.mode == "a":
                for k in tails:
                    self._arrays[k].resize((n,) + self._arrays[k].shape[1:])
        if self.mode == "a":
            self._remove_temp_files()

        raw = dict(root.attrs)
        self._attrs = DatasetAttrs.from_dict(raw) if "dpstack_version" in raw else None
        if self._attrs is not None and n:
            self._check_spec(self._attrs.spec, {k: (a.shape[1:], a.dtype) for k, a in self._arrays.items()},
                             where="attrs spec")

    def _remove_temp_files(self) -> None:
        # Temp files left by a writer killed mid-write (ours and zarr's LocalStore).
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------- properties
    @property
    def attrs(self) -> DatasetAttrs | None:
        return self._attrs

    @property
    def episode_ends(self) -> np.ndarray:
        return self._episode_ends.copy()

    @property
    def n_episodes(self) -> int:
        return int(self._episode_ends.size)

    @property
    def n_steps(self) -> int:
        return int(self._episode_ends[-1]) if self._episode_ends.size else 0

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._arrays)

    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._episode_ends, prepend=0)

    def episode_slice(self, i: int) -> slice:
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range; dataset has {n} episodes")
        i %= n
        start = int(self._episode_ends[i - 1]) if i > 0 else 0
        return slice(start, int(self._episode_ends[i]))

    def shape(self, key: str) -> tuple[int, ...]:
        """Per-step shape of `key`."""
        return tuple(self._arrays[key].shape[1:])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._arrays[key].dtype)

    # ---------------------------------------------------------------- reading
    def _read(self, key: str, sl: slice) -> np.ndarray:
        if key not in self._arrays:
            raise KeyError(f"no key {key!r} in dataset; have {self.keys}")
        try:
            return np.asarray(self._arrays[key][sl])
        except Exception as e:
            raise DatasetError(f"data/{key}: cannot read rows {sl.start}..{sl.stop} "
                               f"(corrupt or unreadable chunk: {type(e).__name__}: {e})") from None

    def get_episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(i)
        return {k: self._read(k, sl) for k in (self.keys if keys is None else keys)}

    def load(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Every committed step of `keys` (default: all) as in-memory numpy arrays."""
        sl = slice(0, self.n_steps)
        return {k: self._read(k, sl) for k in (self.keys if keys is None else keys)}

    # ---------------------------------------------------------------- writing
    def check_attrs(self, attrs: DatasetAttrs) -> None:
        """Raise DatasetError unless every key of `attrs`' spec is stored with its shape and dtype kind."""
        if self.n_steps:
            self._check_spec(attrs.spec, {k: (a.shape[1:], a.dtype) for k, a in self._arrays.items()},
                             where="attrs spec")

    def set_attrs(self, attrs: DatasetAttrs) -> None:
        """Attach or replace the attrs (e.g. on a foreign Diffusion Policy dataset)."""
        self._require_writable()
        self.check_attrs(attrs)
        self._root.attrs.put({**dict(self._root.attrs), **attrs.to_dict()})
        self._attrs = attrs

    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """Append one episode atomically: after a crash it is either fully there or absent."""
        self._require_writable()
        episode = {k: np.asarray(v) for k, v in episode.items()}
        self._check_episode(episode)
        T = next(iter(episode.values())).shape[0]
        n = self.n_steps

        if self.n_episodes == 0:
            self._define_keys(episode)
        for k, v in episode.items():
            arr = self._arrays[k]
            arr.resize((n + T,) + arr.shape[1:])
            _stage(f"resized:{k}")
            arr[n:n + T] = v
            _stage(f"written:{k}")
        self._commit_episode_end(n + T)

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise DatasetError(f"{self.path}: opened read-only; open with mode='a' to append")

    def _check_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        if not episode:
            raise DatasetError("episode has no arrays")
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in episode.items()}
        T = next(iter(lengths.values()))
        for k, t in lengths.items():
            if t is None:
                raise DatasetError(f"episode key {k!r}: 0-D value, expected (steps, ...)")
            if t != T:
                raise DatasetError(f"episode key {k!r}: {t} steps but other keys have {T} ({lengths})")
        if T == 0:
            raise DatasetError("episode has 0 steps")
        if self.n_episodes:
            missing = sorted(set(self.keys) - set(episode))
            extra = sorted(set(episode) - set(self.keys))
            if missing:
                raise DatasetError(f"episode is missing key(s) {missing} that the dataset holds")
            if extra:
                raise DatasetError(f"episode has key(s) {extra} that the dataset does not hold {list(self.keys)}")
            for k, v in episode.items():
                arr = self._arrays[k]
                if v.shape[1:] != arr.shape[1:]:
                    raise DatasetError(f"episode key {k!r}: per-step shape {v.shape[1:]}, dataset has {arr.shape[1:]}")
                if not np.can_cast(v.dtype, arr.dtype, casting="same_kind"):
                    raise DatasetError(f"episode key {k!r}: dtype {v.dtype} cannot be stored as {arr.dtype}")
        if self._attrs is not None:
            self._check_spec(self._attrs.spec, {k: (v.shape[1:], v.dtype) for k, v in episode.items()},
                             where="episode vs attrs spec", values=episode)

    @staticmethod
    def _check_spec(spec: RobotSpec, have: Mapping[str, tuple[tuple[int, ...], Any]], where: str,
                    values: Mapping[str, np.ndarray] | None = None) -> None:
        """Every spec'd key must exist with the spec's per-step shape and dtype kind."""
        for s in (*spec.observations, spec.action):
            if s.key not in have:
                raise DatasetError(f"{where}: key {s.key!r} is in the spec but not in the data (have {sorted(have)})")
            shape, dtype = have[s.key]
            if tuple(shape) != s.shape:
                raise DatasetError(f"{where}: key {s.key!r} has per-step shape {tuple(shape)}, spec says {s.shape}")
            if np.dtype(dtype).kind != np.dtype(s.dtype).kind:
                raise DatasetError(f"{where}: key {s.key!r} has dtype {np.dtype(dtype)}, spec says {s.dtype}")
            if values is not None and np.dtype(dtype).kind == "f" and not np.all(np.isfinite(values[s.key])):
                raise DatasetError(f"{where}: key {s.key!r} contains NaN or Inf")

    def _define_keys(self, episode: Mapping[str, np.ndarray]) -> None:
        """First episode: make data/ hold exactly the episode's keys (a crashed first
        episode may have left other, empty arrays behind)."""
        data = self._root["data"]
        for k in list(self._arrays):
            if k not in episode:
                del data[k]
                del self._arrays[k]
        for k, v in episode.items():
            dtype = self._storage_dtype(k, v.dtype)
            if k in self._arrays and (self._arrays[k].shape[1:] == v.shape[1:] and self._arrays[k].dtype == dtype):
                continue
            if k in self._arrays:
                del data[k]
            step = tuple(v.shape[1:])
            self._arrays[k] = data.create_array(name=k, shape=(0,) + step, chunks=(_time_chunk(step, dtype),) + step,
                                                dtype=dtype, compressors=_compressor(step), fill_value=0)
        self._arrays = dict(sorted(self._arrays.items()))

    def _storage_dtype(self, key: str, dtype: np.dtype) -> np.dtype:
        if self._attrs is not None:
            for s in (*self._attrs.spec.observations, self._attrs.spec.action):
                if s.key == key:
                    return np.dtype(s.dtype)
        return np.dtype(dtype)

    def _commit_episode_end(self, end: int) -> None:
        """Append `end` to meta/episode_ends: the commit point of add_episode.

        Written by hand (zarr v2 format, which is a stable spec) so that the order
        is: chunk holding the new value first, .zarray with the grown shape last.
        Each file is replaced atomically, so the commit is the single rename of .zarray.
        """
        import numcodecs

        folder = self.path / "meta" / "episode_ends"
        zarray_path = folder / ".zarray"
        meta = json.loads(zarray_path.read_text())
        if meta.get("zarr_format") != 2:
            raise DatasetError("meta/episode_ends: can only append to zarr format 2 stores")
        if meta.get("filters"):
            raise DatasetError("meta/episode_ends: has filters; appending to it is not supported")
        ends = np.append(self._episode_ends, np.int64(end))
        if meta["shape"] != [ends.size - 1]:
            raise DatasetError(f"meta/episode_ends: changed on disk (shape {meta['shape']}, expected [{ends.size - 1}])")
        chunk_len = int(meta["chunks"][0])
        ci = (ends.size - 1) // chunk_len
        chunk = np.full(chunk_len, meta.get("fill_value") or 0, dtype=np.dtype(meta["dtype"]))
        part = ends[ci * chunk_len:(ci + 1) * chunk_len]
        chunk[:part.size] = part
        payload = chunk.tobytes(order=meta.get("order", "C"))
        if meta.get("compressor"):
            payload = bytes(numcodecs.get_codec(meta["compressor"]).encode(payload))
        write_atomic(folder / str(ci), payload)
        _stage("commit:chunk")
        meta["shape"] = [int(ends.size)]
        write_atomic(zarray_path, json.dumps(meta, indent=4, sort_keys=True).encode())
        _stage("commit:done")
        self._episode_ends = ends

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        close = getattr(self._store, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReplayBuffer({str(self.path)!r}, episodes={self.n_episodes}, steps={self.n_steps}, keys={list(self.keys)})"


def _is_group(node: Any) -> bool:
    import zarr

    return isinstance(node, zarr.Group)
