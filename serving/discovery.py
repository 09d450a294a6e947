"""Which backends each model has: its URLs as written, or with `discover: true` one backend per
address of each host name (a Kubernetes headless Service), re-resolved every `dns_refresh_seconds`.

A discovered backend is an address, but requests to it keep what the URL says: the host name (and
port) in `Host`, in TLS (SNI and the certificate check) and the userinfo (basic auth). A backend's
own URL, its label in metrics and logs, never carries the userinfo. An address that appears is
health-checked before it takes requests; one that disappears is dropped (requests already on it
finish). A name that stops resolving keeps its last addresses (a DNS hiccup must not empty a
model). Without `discover`, a host name is one backend and aiohttp resolves it per connection.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlsplit, urlunsplit

from yarl import URL

from serving.backend import Backend
from serving.resources import ThrottledLog
from serving.routing import ModelBackends
from serving.upstream import Reach, Upstream

log = logging.getLogger("serving")

# (host, port) -> its addresses; raises OSError when the name does not resolve. Injectable (tests).
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _netloc(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return f"{bracketed}:{port}" if port else bracketed


def backend_url(url: str, address: str | None = None) -> str:
    """The backend's own URL (its label): the configured one without userinfo, at `address` if given."""
    parts = urlsplit(url)
    host = address if address is not None else parts.hostname or ""
    return urlunsplit((parts.scheme, _netloc(host, parts.port), parts.path, "", ""))


def reach_of(url: str, discovered: bool) -> Reach | None:
    """What requests to a backend of this configured URL carry besides the backend's URL; None when
    nothing (the usual case: no lookup per request)."""
    parts = urlsplit(url)
    auth = None
    if parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        auth = "Basic " + base64.b64encode(userinfo).decode("ascii")  # RFC 7617, UTF-8
    if not discovered:
        return Reach(authorization=auth) if auth else None
    host = parts.hostname or ""
    return Reach(host=_netloc(host, parts.port), server_hostname=host if parts.scheme == "https" else None,
                 authorization=auth)


async def _addresses(url: str, resolver: Resolver, warn: Callable[[str], None]) -> list[str] | None:
    """The addresses a URL's host has now (sorted), or None when it cannot be resolved."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = await resolver(host, port)
    except OSError as exc:
        warn(f"cannot resolve {host} ({backend_url(url)}): {exc}; keeping its last addresses")
        return None
    return sorted(set(found))


async def refresh(upstream: Upstream, model: ModelBackends, resolver: Resolver = resolve,
                  warn: Callable[[str], None] = log.warning) -> None:
    """The model's backends from its URLs: resolved again where discovery is on; what is new is
    health-checked, what is gone dropped. `warn` says a name that does not resolve (the loop's is
    throttled: a name down for an hour is not a line every few seconds)."""
    for url in model.entry.backends:
        host = urlsplit(url).hostname or ""
        if not model.entry.discover or _is_address(host):
            model.resolved[url] = [backend_url(url)]
            reach = reach_of(url, discovered=False)
        else:
            addresses = await _addresses(url, resolver, warn)
            if addresses is not None:
                model.resolved[url] = [backend_url(url, address) for address in addresses]
            reach = reach_of(url, discovered=True)
        if reach is not None:
            for address_url in model.resolved.get(url, []):
                upstream.reach[URL(address_url)] = reach
    wanted = list(dict.fromkeys(u for url in model.entry.backends for u in model.resolved.get(url, [])))
    current = {backend.url: backend for backend in model.backends}
    if wanted == list(current):
        return
    new = {url: Backend(url) for url in wanted if url not in current}
    # Checked before they take requests (None, the proxy could not probe: the next round decides).
    probes = await asyncio.gather(*(upstream.healthy(b.base) for b in new.values()))
    model.set_backends([current.get(url) or new[url] for url in wanted])
    for backend, healthy in zip(new.values(), probes, strict=True):
        model.set_health(backend, bool(healthy))
    log.info("%s: backends %s", model.model, ", ".join(wanted) or "none")


async def discovery_loop(upstream: Upstream, models: list[ModelBackends], interval: float,
                         resolver: Resolver = resolve) -> None:
    named = [m for m in models if m.entry.discover
             and any(not _is_address(urlsplit(u).hostname or "") for u in m.entry.backends)]
    failed = {m.model: ThrottledLog() for m in named}
    unresolved = {m.model: ThrottledLog() for m in named}
    while named:
        await asyncio.sleep(interval)
        for model in named:
            try:
                await refresh(upstream, model, resolver, unresolved[model.model].warning)
            except Exception as exc:  # noqa: BLE001 - a failed round must never end the loop; it is said
                failed[model.model].warning(f"{model.model}: DNS discovery round failed ({type(exc).__name__}: "
                                            f"{exc}); its backends stay as they were, next try in {interval:g} s")
        upstream.keep_reach({backend.base for model in models for backend in model.backends})
