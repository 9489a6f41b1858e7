"""The streaming ladder shared by training and the runtime streaming sampler."""
import numpy as np
import pytest

from dpstack.core.ladder import ladder_levels, rung_gap, rungs_for_action_steps


def test_sdp_reference_example():
    # SDP's public defaults: Tp 20, To 2, Ta 8 -> 2 rungs of 8, N 100.
    lv = ladder_levels(20, 2, rungs_for_action_steps(20, 2, 8), 100, chunk_len=8)
    assert lv.tolist() == [49] * 9 + [99] * 11


def test_ta1_every_position_its_own_rung_and_shift_reaches_clean():
    h = rungs_for_action_steps(16, 2, 1)
    assert h == 15
    lv = ladder_levels(16, 2, h, 100)
    assert lv[0] == lv[1]                        # the history position shares the bottom rung
    assert np.all(np.diff(lv[1:]) > 0)           # strictly rising after the history
    assert lv[-1] == 99
    gap = rung_gap(100, h)
    shifted = ladder_levels(16, 2, h, 100, np.arange(gap))
    assert shifted.shape == (gap, 16)
    assert shifted.min() == 0 and shifted[-1, 1] == 0   # the largest shift makes the bottom rung clean
    with pytest.raises(ValueError):
        ladder_levels(16, 2, h, 100, gap)
    with pytest.raises(ValueError):
        ladder_levels(16, 2, 16, 100)            # more rungs than ladder positions
