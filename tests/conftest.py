"""Suite-wide guard: a test that leaves this process at a real-time scheduling policy
(SCHED_FIFO through an in-process `--rt-priority`, say) would hand it to every child
the later tests start, and a spinning child at SCHED_FIFO starves its core. Put the
process back to ordinary scheduling after each test and say which test left it."""
from __future__ import annotations

import os
import warnings

import pytest


@pytest.fixture(autouse=True)
def ordinary_scheduling(request):
    yield
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        warnings.warn(f"{request.node.nodeid} left the test process at a real-time scheduling policy; reset")
