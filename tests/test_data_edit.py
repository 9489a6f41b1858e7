"""`dpstack data edit` on real zarr stores: delete, keep, merge, validation split, in place.
Every test checks the input is byte-for-byte untouched unless --in-place was given."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dpstack.cli import main
from dpstack.core.spec import ActionSpec, ArraySpec, RobotSpec
from dpstack.data.replay_buffer import DatasetAttrs, ReplayBuffer


def make_store(path, n, hz=10.0, first=0, obs_dim=3):
    """n episodes; every value of episode e is its marker first + e."""
    spec = RobotSpec("lift", "Panda", hz, (ArraySpec("pos", (obs_dim,)),), ActionSpec(shape=(2,)))
    rb = ReplayBuffer.create(path, DatasetAttrs("lift", hz, spec, "human"))
    for e in range(n):
        T = 3 + e % 4
        rb.add_episode({"pos": np.full((T, obs_dim), first + e, np.float32),
                        "action": np.full((T, 2), first + e, np.float32)})
    rb.close()
    return path


def markers(path):
    with ReplayBuffer.open(path) as rb:
        eps = [rb.get_episode(i) for i in range(rb.n_episodes)]
    for ep in eps:   # the whole episode came across, not just its first row
        assert np.all(ep["pos"] == ep["pos"][0, 0]) and np.all(ep["action"] == ep["pos"][0, 0])
    return [int(ep["pos"][0, 0]) for ep in eps]


def digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def edit(*args):
    return main(["data", "edit", *map(str, args)])


def test_delete_and_keep_write_a_new_store_and_leave_the_input(tmp_path, capsys):
    src = make_store(tmp_path / "a.zarr", 10)
    before = digests(src)
    assert edit(src, "--out", tmp_path / "b.zarr", "--delete", "1,4:6") == 0
    assert "wrote 7 episodes" in capsys.readouterr().out
    assert markers(tmp_path / "b.zarr") == [0, 2, 3, 6, 7, 8, 9]
    assert edit(src, "--out", tmp_path / "c.zarr", "--keep", "2:8", "--delete", "3") == 0
    assert markers(tmp_path / "c.zarr") == [2, 4, 5, 6, 7]
    assert edit(src, "--out", tmp_path / "d.zarr", "--keep", "7:") == 0
    assert markers(tmp_path / "d.zarr") == [7, 8, 9]
    with ReplayBuffer.open(tmp_path / "c.zarr") as rb:
        assert rb.attrs.control_hz == 10.0 and rb.attrs.extra["edit"]["from"] == ["a.zarr"]
    assert digests(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr", "c.zarr", "d.zarr"]


@pytest.mark.parametrize("args, message", [
    (["--delete", "12"], "--delete 12: out of range; the input has 10 episodes"),
    (["--keep", "5:3"], "--keep 5:3: not a non-empty range"),
    (["--delete", "0:10"], "would leave no episodes"),
    (["--delete", "x"], "expected indices and START:STOP ranges"),
])
def test_bad_selections_are_one_sentence_and_write_nothing(tmp_path, capsys, args, message):
    src = make_store(tmp_path / "a.zarr", 10)
    before = digests(src)
    assert edit(src, "--out", tmp_path / "b.zarr", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert digests(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


def test_merge_same_spec_and_refuse_a_different_one(tmp_path, capsys):
    a = make_store(tmp_path / "a.zarr", 3)
    b = make_store(tmp_path / "b.zarr", 2, first=100)
    before = digests(a), digests(b)
    assert edit(a, b, "--out", tmp_path / "ab.zarr", "--delete", "1") == 0
    assert markers(tmp_path / "ab.zarr") == [0, 2, 100, 101]
    assert (digests(a), digests(b)) == before
    capsys.readouterr()
    make_store(tmp_path / "fast.zarr", 2, hz=20.0)
    assert edit(a, tmp_path / "fast.zarr", "--out", tmp_path / "x.zarr") == 2
    err = capsys.readouterr().err
    assert "cannot merge" in err and "fast.zarr" in err and "control_hz 10.0 vs 20.0" in err
    make_store(tmp_path / "wide.zarr", 2, obs_dim=4)
    assert edit(a, tmp_path / "wide.zarr", "--out", tmp_path / "x.zarr") == 2
    assert "data/pos is (3,) float32 vs (4,) float32" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()


def test_validation_split_is_seeded_and_partitions_the_episodes(tmp_path, capsys):
    src = make_store(tmp_path / "a.zarr", 10)
    before = digests(src)

    def split(name, *args):
        assert edit(src, "--out", tmp_path / f"{name}_train.zarr", "--val-out", tmp_path / f"{name}_val.zarr", *args) == 0
        return markers(tmp_path / f"{name}_train.zarr"), markers(tmp_path / f"{name}_val.zarr")

    train, val = split("f", "--val-fraction", "0.3", "--seed", "1")
    assert len(val) == 3 and sorted(train + val) == list(range(10)) and train == sorted(train)
    assert split("g", "--val-fraction", "0.3", "--seed", "1") == (train, val)
    assert {tuple(split(f"s{s}", "--val-count", "3", "--seed", str(s))[1]) for s in (2, 3)} != {tuple(val)}
    with ReplayBuffer.open(tmp_path / "f_val.zarr") as rb:
        assert rb.attrs.extra["edit"]["part"] == "validation"
    capsys.readouterr()
    assert edit(src, "--out", tmp_path / "z.zarr", "--val-out", tmp_path / "zv.zarr", "--val-count", "10") == 2
    assert "at least one episode on each side" in capsys.readouterr().err
    assert edit(src, "--out", tmp_path / "z.zarr", "--val-fraction", "0.2") == 2
    assert "--val-out" in capsys.readouterr().err
    assert digests(src) == before


def test_in_place_replaces_the_store(tmp_path):
    src = make_store(tmp_path / "a.zarr", 6)
    assert edit(src, "--in-place", "--delete", "0", "--val-out", tmp_path / "v.zarr", "--val-count", "1") == 0
    train, val = markers(src), markers(tmp_path / "v.zarr")
    assert len(train) == 4 and sorted(train + val) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "v.zarr"]   # no temp or old store left
    with ReplayBuffer.open(src, mode="a") as rb:                                  # still appendable
        assert rb.n_episodes == 4


def test_in_place_refusals(tmp_path, capsys):
    a = make_store(tmp_path / "a.zarr", 3)
    make_store(tmp_path / "b.zarr", 3)
    assert edit(a, tmp_path / "b.zarr", "--in-place") == 2
    assert "--in-place takes one input" in capsys.readouterr().err
    assert edit(a, "--out", tmp_path / "b.zarr") == 2
    assert "already exists" in capsys.readouterr().err
    assert edit(a, "--out", tmp_path / "c.zarr.zip") == 2
    assert "without .zip" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr"]


KILLED_EDIT = textwrap.dedent("""
    import os, signal, sys
    import dpstack.data.replay_buffer as rbmod
    from dpstack.data.edit import edit

    def hook(stage):   # die after two episodes of the new store, half way through the edit
        hook.commits += stage == "commit:done"
        if hook.commits == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    hook.commits = 0
    rbmod._stage_hook = hook
    edit([sys.argv[1]], in_place=True, delete=[0])
""")


def test_in_place_killed_mid_edit_leaves_the_original_intact(tmp_path):
    src = make_store(tmp_path / "a.zarr", 5)
    before = digests(src)
    proc = subprocess.run([sys.executable, "-c", KILLED_EDIT, str(src)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert digests(src) == before and markers(src) == [0, 1, 2, 3, 4]
    left = [p.name for p in tmp_path.iterdir() if p.name != "a.zarr"]
    assert len(left) == 1 and left[0].startswith(".a.zarr.edit-") and left[0].endswith(".partial")
    assert os.path.isdir(tmp_path / left[0])
