"""Is a server up? One HTTP health probe and one deadline-bound poller, for the launcher, the
benchmarks' helper processes and the tests (never a bare sleep as synchronisation)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

POLL_SECONDS = 0.25


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """GET url answers 200 (anything else, or no answer within timeout, is False)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = POLL_SECONDS) -> None:
    """Poll condition until it is true; TimeoutError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
