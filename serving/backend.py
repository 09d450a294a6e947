"""One backend (one engine server) of a model: its URL and the state routing keeps of it.

Data only: routing (serving/routing.py), outlier ejection (serving/ejection.py), discovery and
the exchange read and update it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from yarl import URL

# The targets of the shaped routes: their URLs are built once per backend.
CACHED_TARGETS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(eq=False)
class Backend:
    url: str
    healthy: bool = False
    in_flight: int = 0
    keys: int = 0  # live prefix-affinity keys placed here (ModelBackends' Placements)
    # Outlier ejection (serving/ejection.py): failures in a row, the cool-down multiplier, out until
    # when (0: in rotation; past: half-open), and when it last came back.
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    returned_at: float = 0.0
    _urls: dict[str, URL] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.base = URL(self.url)

    def url_for(self, target: str) -> URL:
        """The backend URL of a path (and query) exactly as given: `encoded=True` keeps the client's
        percent-encoding, already validated, rather than re-encoding it."""
        url = self._urls.get(target)
        if url is None:
            url = URL(self.url + target, encoded=True)
            if target in CACHED_TARGETS:
                self._urls[target] = url
        return url
