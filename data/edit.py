"""`dpstack data edit`: delete episodes, keep a range, merge stores, split off a validation set,
make quaternion observations sign-continuous (the rule of dpstack.core.quaternion).

An edit never writes into its input. Each output is built in a temporary store beside
its destination and renamed into place when complete, so an interrupted edit leaves no
half-written output. With `in_place`, the finished store replaces the input by two
renames (input aside, new store in, then the old one is deleted): a crash at any point
leaves the original complete, under its own name or, between the two renames, under
`.NAME.old-<id>` beside it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from dpstack.core.files import staged_dir
from dpstack.core.quaternion import continue_episode, count_sign_flips, quaternion_layout
from dpstack.data.replay_buffer import DatasetAttrs, DatasetError, ReplayBuffer


@dataclass
class EditResult:
    out: Path
    n_episodes: int
    n_steps: int
    val_out: Path | None = None
    val_episodes: int = 0
    # (before, after) quaternion sign flips over the written episodes, with continuous_quaternions.
    quaternion_flips: tuple[int, int] | None = None

Transform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class FlipCounter:
    """Continues an episode's quaternions and counts the sign flips it removed."""

    def __init__(self, layout: Mapping[str, Sequence[slice]]) -> None:
        self.layout = layout
        self.before = self.after = 0

    def _flips(self, episode: Mapping[str, np.ndarray]) -> int:
        return sum(count_sign_flips(episode[k][:, sl]) for k, sls in self.layout.items() for sl in sls)

    def __call__(self, episode: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.before += self._flips(episode)
        out = continue_episode(episode, self.layout)
        self.after += self._flips(out)
        return out


def quaternion_fixer(attrs: DatasetAttrs | None, path: Path) -> FlipCounter:
    """The continuity transform for a store whose spec names its quaternions."""
    layout = quaternion_layout(attrs.spec.observations) if attrs is not None else {}
    if not layout:
        raise DatasetError(f"{path}: its spec names no quaternion observations (*_quat keys or NAME_quat[i] dims); "
                           f"there is nothing to make continuous")
    return FlipCounter(layout)


def parse_episodes(text: str) -> list[int]:
    """'3,5,7:10' -> [3, 5, 7, 8, 9] (ranges are START:STOP, stop excluded)."""
    out: list[int] = []
    for item in (t.strip() for t in text.split(",")):
        try:
            if ":" in item:
                start, stop = parse_range(item)
                if stop is None:
                    raise ValueError
                out.extend(range(start, stop))
            else:
                out.append(int(item))
        except ValueError:
            raise DatasetError(f"episodes {text!r}: expected indices and START:STOP ranges, e.g. 3,5,7:10") from None
    if any(i < 0 for i in out):
        raise DatasetError(f"episodes {text!r}: indices count from 0")
    return out


def parse_range(text: str) -> tuple[int, int | None]:
    """'10:50' -> (10, 50); '10:' -> (10, None); ':50' -> (0, 50)."""
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start or 0), (int(stop) if stop.strip() else None)
    except ValueError:
        raise DatasetError(f"range {text!r}: expected START:STOP (episode indices, stop excluded), e.g. 10:50") from None


def spec_difference(a: ReplayBuffer, b: ReplayBuffer) -> str | None:
    """What keeps `b`'s episodes from joining `a`'s, or None."""
    have = {k: (a.shape(k), a.dtype(k)) for k in a.keys}
    other = {k: (b.shape(k), b.dtype(k)) for k in b.keys}
    if set(have) != set(other):
        return f"keys {sorted(have)} vs {sorted(other)}"
    for k in have:
        if have[k] != other[k]:
            return f"data/{k} is {have[k][0]} {have[k][1]} vs {other[k][0]} {other[k][1]}"
    if (a.attrs is None) != (b.attrs is None):
        return "one has dpstack attrs, the other none (add them with `dpstack data describe`)"
    if a.attrs is not None:
        sa, sb = a.attrs.spec.to_dict(), b.attrs.spec.to_dict()
        for field in ("task", "robot", "control_hz", "observations", "action", "extra"):
            if sa[field] != sb[field]:
                return f"spec {field} {sa[field]} vs {sb[field]}"
    return None


def select(n: int, delete: Sequence[int] = (), keep: tuple[int, int | None] | None = None) -> list[int]:
    """Episode indices of 0..n-1 inside `keep` (START, STOP) and not in `delete`."""
    bad = [i for i in delete if i >= n]
    if bad:
        raise DatasetError(f"--delete {bad[0]}: out of range; the input has {n} episodes (0..{n - 1})")
    start, stop = keep if keep is not None else (0, n)
    stop = n if stop is None else stop
    if keep is not None and not 0 <= start < stop <= n:
        raise DatasetError(f"--keep {start}:{stop}: not a non-empty range inside the {n} episodes (0..{n})")
    gone = set(delete)
    chosen = [i for i in range(start, stop) if i not in gone]
    if not chosen:
        raise DatasetError("the edit would leave no episodes")
    return chosen


def split_validation(episodes: Sequence[int], fraction: float | None, count: int | None,
                     seed: int) -> tuple[list[int], list[int]]:
    """(train, val): `count` or round(fraction * n) episodes drawn with `seed`, both in order."""
    n = len(episodes)
    if fraction is not None:
        if not 0 < fraction < 1:
            raise DatasetError(f"--val-fraction {fraction}: must be between 0 and 1")
        count = max(1, round(fraction * n))
    if count is None or not 1 <= count < n:
        raise DatasetError(f"--val-count {count}: must leave at least one episode on each side of {n}")
    val = set(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())
    return ([e for i, e in enumerate(episodes) if i not in val], [e for i, e in enumerate(episodes) if i in val])


def edit(inputs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *, in_place: bool = False,
         delete: Sequence[int] = (), keep: tuple[int, int | None] | None = None,
         val_out: str | os.PathLike | None = None, val_fraction: float | None = None, val_count: int | None = None,
         seed: int = 0, continuous_quaternions: bool = False) -> EditResult:
    """Merge `inputs` (episodes numbered across them in order), select, optionally split, and write;
    with `continuous_quaternions` every quaternion observation is made sign-continuous per episode."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DatasetError("name at least one input store")
    if in_place == (out is not None):
        raise DatasetError("give either --out DST or --in-place")
    if in_place and len(paths) > 1:
        raise DatasetError("--in-place takes one input; write a merge to a new store with --out")
    if in_place and paths[0].suffix == ".zip":
        raise DatasetError(f"{paths[0]}: a .zip store is read-only; write the edit to a new store with --out")
    if (val_fraction is not None or val_count is not None) != (val_out is not None):
        raise DatasetError("a validation split needs --val-out and one of --val-fraction / --val-count")
    dst = paths[0] if in_place else Path(out)
    for p in ([] if in_place else [dst]) + ([Path(val_out)] if val_out is not None else []):
        if p.suffix == ".zip":
            raise DatasetError(f"{p}: an edit writes a directory store; name it without .zip and zip it afterwards")
        if p.exists():
            raise FileExistsError(f"{p} already exists; choose a new path (an edit never overwrites a store)")

    sources = [ReplayBuffer.open(p) for p in paths]
    try:
        for p, rb in zip(paths[1:], sources[1:]):
            why = spec_difference(sources[0], rb)
            if why:
                raise DatasetError(f"cannot merge {p} into {paths[0]}: {why}")
        # (source, episode) for every episode of the merged inputs, in order.
        episodes = [(rb, i) for rb in sources for i in range(rb.n_episodes)]
        chosen = select(len(episodes), delete, keep)
        val: list[int] = []
        if val_out is not None:
            chosen, val = split_validation(chosen, val_fraction, val_count, seed)
        attrs = sources[0].attrs
        fix = quaternion_fixer(attrs, paths[0]) if continuous_quaternions else None
        if fix is not None:
            attrs = DatasetAttrs(attrs.task, attrs.control_hz, attrs.spec, attrs.source,
                                 {**attrs.extra, "quaternions": "sign-continuous"})
        if val:
            _write_new(Path(val_out), [episodes[i] for i in val], _edited(attrs, paths, "validation", seed), fix)
        note = "train" if val else "edit"
        if in_place:
            _replace(dst, [episodes[i] for i in chosen], _edited(attrs, paths, note, seed), fix)
        else:
            _write_new(dst, [episodes[i] for i in chosen], _edited(attrs, paths, note, seed), fix)
        steps = int(np.concatenate([rb.episode_lengths() for rb in sources])[chosen].sum())
    finally:
        for rb in sources:
            rb.close()
    return EditResult(dst, len(chosen), steps, Path(val_out) if val else None, len(val),
                      (fix.before, fix.after) if fix is not None else None)


def _edited(attrs: DatasetAttrs | None, paths: Sequence[Path], part: str, seed: int) -> DatasetAttrs | None:
    if attrs is None:
        return None
    extra = {**attrs.extra, "edit": {"from": [p.name for p in paths], "part": part, "seed": seed}}
    return DatasetAttrs(attrs.task, attrs.control_hz, attrs.spec, attrs.source, extra)


def _build(path: Path, episodes: Sequence[tuple[ReplayBuffer, int]], attrs: DatasetAttrs | None,
           transform: Transform | None = None) -> None:
    # attrs go on last, so arrays keep the source's dtypes (an attrs spec would cast them).
    rb = ReplayBuffer.create(path, None)
    for src, i in episodes:
        episode = src.get_episode(i)
        rb.add_episode(transform(episode) if transform is not None else episode)
    if attrs is not None:
        rb.set_attrs(attrs)
    rb.close()


def _write_new(path: Path, episodes: Sequence[tuple[ReplayBuffer, int]], attrs: DatasetAttrs | None,
               transform: Transform | None = None) -> None:
    with staged_dir(path, tag="edit") as tmp:
        _build(tmp, episodes, attrs, transform)


def _replace(path: Path, episodes: Sequence[tuple[ReplayBuffer, int]], attrs: DatasetAttrs | None,
             transform: Transform | None = None) -> None:
    with staged_dir(path, overwrite=True, tag="edit") as tmp:
        _build(tmp, episodes, attrs, transform)
