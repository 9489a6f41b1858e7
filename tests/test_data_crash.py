"""A writer SIGKILLed mid-episode loses only that episode: earlier episodes stay
readable, the partial one is dropped with a warning, and appending carries on.
Real subprocesses, real kills, real zarr directory stores."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dpstack.data.replay_buffer import PartialEpisodeWarning, ReplayBuffer

# Episode e has length 20 + e and every value encodes (episode, step), so a
# reader can check each committed episode row by row.
WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import dpstack.data.replay_buffer as rbmod
    from dpstack.data.replay_buffer import ReplayBuffer, DatasetAttrs
    from dpstack.core.spec import RobotSpec, ArraySpec, ActionSpec

    def episode(e):
        T = 20 + e
        v = (e * 1000 + np.arange(T)).astype(np.float32)
        return {"obs": np.stack([v, v + 0.5], 1),
                "image": np.broadcast_to((np.arange(T) % 251).astype(np.uint8)[:, None, None, None], (T, 48, 48, 3)).copy(),
                "action": np.repeat(v[:, None], 4, 1)}

    path, stop_at, stop_episode = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = RobotSpec("t", "r", 10.0, (ArraySpec("obs", (2,)), ArraySpec("image", (48, 48, 3), "uint8")),
                     ActionSpec(shape=(4,)))
    try:
        rb = ReplayBuffer.open(path, mode="a")
    except FileNotFoundError:
        rb = ReplayBuffer.create(path, DatasetAttrs("t", 10.0, spec, "scripted_expert"))

    def hook(stage):
        if rb.n_episodes == stop_episode and stage == stop_at:
            print("STOPPED", stage, flush=True)
            time.sleep(600)
    rbmod._stage_hook = hook
    while True:
        rb.add_episode(episode(rb.n_episodes))
        print("EPISODE", rb.n_episodes, flush=True)
""")


def expected_episode(e):
    T = 20 + e
    v = (e * 1000 + np.arange(T)).astype(np.float32)
    return {"obs": np.stack([v, v + 0.5], 1), "action": np.repeat(v[:, None], 4, 1),
            "image": np.broadcast_to((np.arange(T) % 251).astype(np.uint8)[:, None, None, None], (T, 48, 48, 3))}


def start_writer(tmp_path, stop_at="never", stop_episode=-1):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "d.zarr"), stop_at, str(stop_episode)],
                            stdout=subprocess.PIPE, text=True)


def check_intact(path, mode="r"):
    rb = ReplayBuffer.open(path, mode=mode)
    for e in range(rb.n_episodes):
        got, want = rb.get_episode(e), expected_episode(e)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"episode {e} key {k}")
    return rb


@pytest.mark.parametrize("stage, committed", [
    ("resized:obs", False),      # first array grown, nothing written into it yet
    ("written:image", False),    # some arrays hold the new rows, others do not
    ("written:action", False),   # every array written, episode_ends untouched
    ("commit:chunk", False),     # new episode_ends chunk on disk, shape not grown yet
    ("commit:done", True),       # commit point passed: the episode must survive
])
def test_sigkill_at_each_stage_of_an_append(tmp_path, stage, committed):
    proc = start_writer(tmp_path, stage, stop_episode=2)
    try:
        for line in proc.stdout:
            if line.startswith("STOPPED"):
                break
        else:
            pytest.fail(f"writer exited without reaching {stage}: rc {proc.wait()}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    path = tmp_path / "d.zarr"
    if committed:
        rb = check_intact(path)
        assert rb.n_episodes == 3
    else:
        with pytest.warns(PartialEpisodeWarning, match="partial episode"):
            rb = check_intact(path)
        assert rb.n_episodes == 2
        # reading tolerates the tail; appending truncates it (and warns again)
        with pytest.warns(PartialEpisodeWarning, match="truncated"):
            rb = ReplayBuffer.open(path, mode="a")
        assert not list(path.rglob("*.partial"))
    rb = ReplayBuffer.open(path, mode="a")
    n = rb.n_episodes
    for e in range(n, n + 2):
        ep = expected_episode(e)
        rb.add_episode({k: np.ascontiguousarray(v) for k, v in ep.items()})
    rb = check_intact(path)
    assert rb.n_episodes == n + 2
    assert rb.n_steps == sum(20 + e for e in range(n + 2))


def test_sigkill_at_random_times_never_loses_committed_episodes(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "d.zarr"
    seen_partial, committed = 0, 0
    for round_ in range(6):
        proc = start_writer(tmp_path)
        try:
            # wait until at least one episode of this round is in, then kill at a random moment
            for line in proc.stdout:
                if line.startswith("EPISODE"):
                    break
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rb = check_intact(path, mode="a")
        seen_partial += any(issubclass(w.category, PartialEpisodeWarning) for w in caught)
        assert rb.n_episodes > committed  # every round commits at least one episode
        committed = rb.n_episodes
    # the kills should land mid-episode at least sometimes; if never, the test is not testing much
    assert seen_partial >= 1
