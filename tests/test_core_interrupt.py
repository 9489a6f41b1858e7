"""Ctrl-C inside a shielded block (a robosuite step) waits for the block to end; outside
it raises at once, as Python's own handler does. Real signals sent to this process."""
from __future__ import annotations

import os
import signal

import pytest

from dpstack.core import interrupt


@pytest.fixture
def routed():
    previous = interrupt.install(signal.SIGINT, signal.SIGTERM)
    yield
    interrupt.restore(previous)


def test_outside_a_shield_the_signal_interrupts_at_once(routed):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs at the next bytecode
            pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_inside_a_shield_the_signal_waits_for_the_block_to_end(routed, signum):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt.shielded():
            os.kill(os.getpid(), signum)
            for _ in range(1000):
                pass
            with interrupt.shielded():  # nested: only the outermost block raises
                pass
            finished.append(True)
    assert finished == [True]
    with interrupt.shielded():  # delivered once, not again
        pass


def test_restore_gives_back_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    interrupt.restore(interrupt.install(signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is before
