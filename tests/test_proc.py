"""The deadline every child of the suite runs under (tests/proc.py), shown on children that hang."""
import subprocess
import sys
import time

import pytest

import proc

HANG = [sys.executable, "-c", "import time; time.sleep(600)"]


def sleeper(rank):
    time.sleep(600)


@pytest.mark.parametrize("how", ["run", "started", "spawn"])
def test_a_hanging_child_fails_its_test_in_seconds_naming_its_command(how):
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as e:
        if how == "run":
            proc.run(HANG, timeout=2)
        elif how == "started":
            with proc.started(HANG, timeout=2, stdout=subprocess.PIPE) as p:
                p.stdout.read()  # returns once the watchdog has killed the child
        else:
            proc.spawn(sleeper, (), 2, timeout=2)
    assert time.monotonic() - t0 < 60
    named = "time.sleep(600)" if how != "spawn" else "2 processes of sleeper"
    assert "no exit after 2 s, killed" in str(e.value) and named in str(e.value), str(e.value)
