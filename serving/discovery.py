"""Backends discovered by DNS: a backend URL whose host resolves to many addresses (a Kubernetes
headless Service) is one backend per address, re-resolved every `dns_refresh_seconds`.

An address that appears is health-checked before it takes requests; one that disappears is
dropped (requests already on it finish). A URL with an IP address is one backend, as written. A
name that stops resolving keeps its last addresses (a DNS hiccup must not empty a model).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from urllib.parse import urlsplit, urlunsplit

from serving.routing import Backend, ModelBackends
from serving.upstream import Upstream

log = logging.getLogger("serving")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_address(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def _addresses(url: str) -> list[str] | None:
    """The addresses a URL's host has now (sorted), or None when it cannot be resolved."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _is_address(host):
        return [host]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve %s (%s): %s; keeping its last addresses", host, url, exc)
        return None
    return sorted({str(info[4][0]) for info in infos})


async def refresh(upstream: Upstream, model: ModelBackends) -> None:
    """Resolve every backend URL of the model again; health-check what is new, drop what is gone."""
    for url in model.entry.backends:
        addresses = await _addresses(url)
        if addresses is not None:
            literal = _is_address(urlsplit(url).hostname or "")
            model.resolved[url] = [url] if literal else [_with_address(url, a) for a in addresses]
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


async def discovery_loop(upstream: Upstream, models: list[ModelBackends], interval: float) -> None:
    named = [m for m in models if any(not _is_address(urlsplit(u).hostname or "") for u in m.entry.backends)]
    while named:
        await asyncio.sleep(interval)
        for model in named:
            with contextlib.suppress(Exception):  # a failed round must never end the loop
                await refresh(upstream, model)
