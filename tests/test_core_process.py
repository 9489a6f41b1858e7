"""A child started through dpstack.core.process dies with its parent, even when the
parent is killed outright (SIGKILL leaves no chance to stop it in order). Real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent("""
    import sys, time
    from dpstack.core.process import ChildProcess
    child = ChildProcess([sys.executable, "-c", "import time; time.sleep(120)"], "sleeper")
    print(child.proc.pid, flush=True)
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but listed until its parent (here: init) reaps it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's prctl")
def test_a_child_does_not_outlive_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child_pid), "the child outlived its killed parent"
    finally:
        parent.kill()
        try:
            os.kill(child_pid, signal.SIGKILL)
        except (ProcessLookupError, NameError, UnboundLocalError):
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's prctl")
def test_a_child_started_from_a_short_lived_thread_outlives_that_thread():
    """The kernel's parent-death signal follows the starting thread: a server restarted from
    a helper thread must not be stopped when that thread ends."""
    import threading

    from dpstack.core.process import ChildProcess

    started = []
    t = threading.Thread(target=lambda: started.append(
        ChildProcess([sys.executable, "-c", "import time; time.sleep(120)"], "sleeper")))
    t.start()
    t.join()
    child = started[0]
    try:
        time.sleep(1.0)
        assert child.alive(), "the child died with the thread that started it"
    finally:
        child.kill()
