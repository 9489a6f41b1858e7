"""SequenceWindows: Diffusion Policy's padding (repeat first/last frame), no
window crossing an episode boundary, and batch() agreeing with __getitem__."""
import numpy as np
import pytest

from dpstack.data.windows import SequenceWindows


def _arrays(lengths):
    """Frame value = (episode * 1000 + step), so every row says where it came from."""
    ends = np.cumsum(lengths)
    rows = np.concatenate([e * 1000 + np.arange(L) for e, L in enumerate(lengths)]).astype(np.float32)
    arrays = {"obs": np.stack([rows, -rows], axis=1),
              "img": np.broadcast_to(rows.astype(np.uint8)[:, None, None, None], (rows.size, 2, 2, 3)).copy(),
              "action": rows[:, None].repeat(3, axis=1)}
    return arrays, ends


def test_window_count_matches_diffusion_policy_formula():
    lengths = [10, 4, 25]
    arrays, ends = _arrays(lengths)
    Tp, To, Ta = 8, 2, 4
    w = SequenceWindows(arrays, ends, Tp, To, Ta, obs_keys=["obs"])
    # DP: starts from -(To-1) to L - Tp + (Ta-1) inclusive, none when negative.
    expected = sum(max(0, L - Tp + (Ta - 1) + (To - 1) + 1) for L in lengths)
    assert len(w) == expected
    # a 4-step episode still gives one window (start -1: frames 0,0,1,2,3,3,3,3)
    assert len(w) == 7 + 1 + 22
    short = w[7]["action"][:, 0] - 1000
    assert short.tolist() == [0, 0, 1, 2, 3, 3, 3, 3]


def test_padding_repeats_first_and_last_frame_exactly():
    arrays, ends = _arrays([12, 9])
    Tp, To, Ta = 6, 3, 3
    w = SequenceWindows(arrays, ends, Tp, To, Ta, obs_keys=["obs", "img"])
    first = w[0]
    # first window of episode 0 starts at t = -(To-1): frame 0 repeated To-1 extra times
    assert first["action"][:, 0].tolist() == [0, 0, 0, 1, 2, 3]
    assert first["obs"].shape == (To, 2)
    assert first["obs"][:, 0].tolist() == [0, 0, 0]
    assert first["img"].shape == (To, 2, 2, 3) and first["img"].dtype == np.uint8

    n0 = 12 - Tp + (Ta - 1) + (To - 1) + 1
    last0 = w[n0 - 1]
    # last window of episode 0 runs Ta-1 steps past the end, repeating frame 11
    assert last0["action"][:, 0].tolist() == [8, 9, 10, 11, 11, 11]
    first1 = w[n0]
    assert first1["action"][:, 0].tolist() == [1000, 1000, 1000, 1001, 1002, 1003]
    assert w[-1]["action"][:, 0].tolist() == [1005, 1006, 1007, 1008, 1008, 1008]


def test_no_window_crosses_an_episode_boundary_and_all_steps_covered():
    lengths = [7, 13, 5, 20]
    arrays, ends = _arrays(lengths)
    w = SequenceWindows(arrays, ends, 8, 2, 4, obs_keys=["obs"])
    b = w.batch(np.arange(len(w)))
    episode_of = b["action"][:, :, 0] // 1000
    assert np.all(episode_of == episode_of[:, :1])
    steps = b["action"][:, :, 0] % 1000
    assert np.all(np.diff(steps, axis=1) >= 0)  # time moves forward or holds (padding)
    assert np.all(np.diff(steps, axis=1) <= 1)
    # every frame of every episode appears in some window
    seen = set(b["action"][:, :, 0].ravel().tolist())
    assert seen == set(arrays["action"][:, 0].tolist())


def test_batch_equals_getitem_and_episode_subset():
    arrays, ends = _arrays([15, 11, 30])
    w = SequenceWindows(arrays, ends, 16, 2, 8, obs_keys=["obs", "img"])
    idx = np.random.default_rng(0).integers(0, len(w), size=64)
    b = w.batch(idx)
    for j, i in enumerate(idx[:10]):
        one = w[int(i)]
        for k in one:
            np.testing.assert_array_equal(b[k][j], one[k])
    assert b["action"].shape == (64, 16, 3) and b["obs"].shape == (64, 2, 2)

    val = SequenceWindows(arrays, ends, 16, 2, 8, obs_keys=["obs"], episodes=[1])
    got = val.batch(np.arange(len(val)))["action"][:, :, 0] // 1000
    assert len(val) == 11 - 16 + 7 + 1 + 1 and np.all(got == 1)


def test_bad_arguments_are_refused():
    arrays, ends = _arrays([10])
    with pytest.raises(ValueError, match="horizon"):
        SequenceWindows(arrays, ends, 4, 2, 8, obs_keys=["obs"])
    with pytest.raises(KeyError, match="nope"):
        SequenceWindows(arrays, ends, 8, 2, 4, obs_keys=["nope"])
    with pytest.raises(ValueError, match="rows"):
        SequenceWindows({k: v[:5] for k, v in arrays.items()}, ends, 8, 2, 4, obs_keys=["obs"])
    w = SequenceWindows(arrays, ends, 8, 2, 4, obs_keys=["obs"])
    with pytest.raises(IndexError):
        w[len(w)]
