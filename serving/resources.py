"""The proxy's own limits: open files raised at start, and running out of them told apart from a
backend failure.

Out of file descriptors (or kernel buffers) the proxy cannot open a connection to any backend;
that is the proxy's limit, not vLLM's: it must answer 503 saying so, and never mark a healthy
backend down (which would empty `/ready` and take the pod out of its Service).
"""

from __future__ import annotations

import errno
import logging
import resource
import time

log = logging.getLogger("serving")

# Errors that mean this process (or this host) ran out of something, whatever the peer does.
EXHAUSTED = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.ENOBUFS: "ENOBUFS", errno.ENOMEM: "ENOMEM"}
WHAT = {
    "EMFILE": "the proxy process is out of file descriptors (its open-files limit)",
    "ENFILE": "the host is out of file descriptors (the system-wide limit)",
    "ENOBUFS": "the host is out of socket buffer space",
    "ENOMEM": "the host is out of memory for sockets",
}
LOG_INTERVAL_SECONDS = 10.0


def raise_open_files_limit() -> str:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the line to log with both figures.

    Every stream holds two descriptors (client and backend); the common default soft limit of
    1,024 would cap the proxy near 500 streams while the hard limit is often far higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY and soft >= 1 << 20:
        return f"open files: soft limit {soft}, hard limit {_figure(hard)} (nothing to raise)"
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        return f"open files: soft limit {soft} kept, could not raise it to {_figure(hard)}: {exc}"
    return f"open files: soft limit raised from {soft} to {target} (hard limit {_figure(hard)})"


def _figure(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def exhausted(exc: BaseException | None) -> str | None:
    """The errno name when `exc` (or what it wraps) says a local resource ran out."""
    seen = 0
    while exc is not None and seen < 5:
        code = getattr(exc, "errno", None)
        if code in EXHAUSTED:
            return EXHAUSTED[code]
        exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


class ThrottledLog:
    """One log line per interval for a condition that may hit every request at once."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._last = float("-inf")
        self._suppressed = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last report)"
        self._last, self._suppressed = now, 0
        log.warning(message)
