"""Every process a test starts goes through here, with a deadline: a child that hangs is killed and
fails its test within minutes, naming its command, instead of holding CI for its whole run."""
import contextlib
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 300  # seconds: the slowest child here (a tiny train.py run) takes a few


def shown(cmd):
    return " ".join(map(str, cmd))


def run(cmd, timeout=LIMIT, **kw):
    """subprocess.run from the repository root, text output captured; killed and failed past timeout."""
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit after {timeout} s, killed: {shown(cmd)}", pytrace=False)


@contextlib.contextmanager
def started(cmd, timeout=LIMIT, **kw):
    """A child the test talks to while it runs (a lock holder, a run to interrupt). A watchdog kills
    it past timeout, which ends any read of its pipes; it is killed when the test is done with it."""
    p, fired = subprocess.Popen(cmd, cwd=ROOT, **kw), []
    watchdog = threading.Timer(timeout, lambda: (fired.append(True), p.kill()))
    watchdog.start()
    try:
        yield p
    finally:
        watchdog.cancel()
        p.kill()
        p.wait()
        if fired:
            pytest.fail(f"no exit after {timeout} s, killed: {shown(cmd)}", pytrace=False)


def spawn(fn, args, nprocs, timeout=LIMIT):
    """torch.multiprocessing.spawn with a deadline: fn(rank, *args) in nprocs processes."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"no exit after {timeout} s, killed: {nprocs} processes of {fn.__name__}{args}",
                        pytrace=False)
