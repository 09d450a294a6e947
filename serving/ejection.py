"""Passive outlier ejection: a backend that fails requests in a row leaves rotation for a while.

The /health probes see a process that answers; they do not see a backend that answers 500 to
every generation (a broken GPU, a wedged engine) while its /health is fine. Each attempt's
outcome is reported (`ModelBackends.report`): a failure is a 5xx the backend produced, a reset
after the request went out, or a timeout; a 2xx or a client's 4xx is a success and resets the
count. After `consecutive_failures` in a row the backend is ejected for base x the times it was
ejected (at most `max_ejection_seconds`), never when that would leave the model without a usable
backend, nor beyond `max_ejected_percent` of its backends (one may always go when there are two
or more, as with Envoy's always_eject_one_host). After the cool-down it is half-open: it takes
one request at a time (only while nothing of its own is in flight); a success puts it back in
rotation, a failure ejects it again, for longer. Its /health answering does not end an ejection:
it answered all along. Each `base_ejection_seconds` back in rotation forgives one ejection, so a
backend that recovered is not ejected for the maximum at its next stumble. Nothing here retries
a request: it only decides where the next ones go.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from serving.backend import Backend
from serving.config import OutlierEjection
from serving.resources import ThrottledLog

if TYPE_CHECKING:
    from prometheus_client import Counter


log = logging.getLogger("serving")

UP, DOWN, EJECTED, HALF_OPEN = "up", "down", "ejected", "half_open"


class Ejection:
    """The ejection state machine of one model's backends (the state itself is on each Backend)."""

    def __init__(self, model: str, policy: OutlierEjection, ejections: Counter,
                 clock: Callable[[], float]) -> None:
        self.model = model
        self.policy = policy
        self.ejections = ejections
        self.clock = clock
        self.out = 0  # backends ejected or half-open: while 0, routing need not look at the clock
        self._kept = ThrottledLog()

    def recount(self, backends: Sequence[Backend]) -> None:
        self.out = sum(1 for b in backends if b.ejected_until)

    def report(self, backend: Backend, ok: bool, backends: Sequence[Backend]) -> None:
        threshold = self.policy.consecutive_failures
        if not threshold:
            return
        if backend.ejected_until:
            now = self.clock()
            if now < backend.ejected_until:
                return  # a request sent before the ejection: its cool-down stands
            if ok:  # the trial succeeded
                self._restore(backend, now)
            else:
                self._eject(backend, now, f"its trial request after {self._cooldown(backend):g} s out failed")
            return
        if ok:
            backend.failures = 0
            return
        backend.failures += 1
        if backend.failures >= threshold and backend in backends:  # not one discovery dropped meanwhile
            self._eject_if_allowed(backend, backends)

    def usable(self, backend: Backend, now: float) -> bool:
        """In rotation, or half-open with no request of its own in flight (its one trial)."""
        return not backend.ejected_until or now >= backend.ejected_until and backend.in_flight == 0

    def state(self, backend: Backend, now: float) -> str:
        if backend.ejected_until and now < backend.ejected_until:
            return EJECTED
        if not backend.healthy:
            return DOWN
        return HALF_OPEN if backend.ejected_until else UP

    def _eject_if_allowed(self, backend: Backend, backends: Sequence[Backend]) -> None:
        total = len(backends)
        allowed = max(1, total * self.policy.max_ejected_percent // 100) if total > 1 else 0
        others = any(b is not backend and b.healthy and not b.ejected_until for b in backends)
        if self.out >= allowed or not others:
            why = "the last usable backend" if not others else \
                f"{self.out} of {total} already out (max_ejected_percent {self.policy.max_ejected_percent})"
            self._kept.warning(f"{backend.url} ({self.model}) failed {backend.failures} requests in a row but "
                               f"stays in rotation: {why}")
            return
        now = self.clock()
        # Each base_ejection_seconds back in rotation forgives one earlier ejection (Envoy decrements
        # its multiplier every interval the host stays healthy).
        forgiven = int((now - backend.returned_at) / self.policy.base_ejection_seconds)
        backend.ejections = max(backend.ejections - forgiven, 0)
        self.out += 1
        self._eject(backend, now, f"{backend.failures} failed requests in a row")

    def _eject(self, backend: Backend, now: float, why: str) -> None:
        backend.ejections += 1
        backend.failures = 0
        seconds = self._cooldown(backend)
        backend.ejected_until = now + seconds
        self.ejections.labels(self.model, backend.url).inc()
        log.warning("%s (%s) out of rotation for %g s after %s (ejection %d; then one trial request)",
                    backend.url, self.model, seconds, why, backend.ejections)

    def _restore(self, backend: Backend, now: float) -> None:
        backend.ejected_until = 0.0
        backend.failures = 0
        backend.returned_at = now
        self.out -= 1
        log.info("%s (%s) back in rotation: its trial request succeeded", backend.url, self.model)

    def _cooldown(self, backend: Backend) -> float:
        return float(min(self.policy.base_ejection_seconds * backend.ejections, self.policy.max_ejection_seconds))
