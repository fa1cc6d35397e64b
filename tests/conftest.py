"""A hang inside the test process itself (a read that never returns) cannot be killed from outside,
as a child is (tests/proc.py): past the limit, every thread's stack is printed and pytest exits, so
CI fails in minutes and shows where."""
import faulthandler

import pytest

TEST_LIMIT = 900  # seconds for one test with its fixtures; the slowest takes about a minute on 2 cores


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    faulthandler.dump_traceback_later(TEST_LIMIT, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
