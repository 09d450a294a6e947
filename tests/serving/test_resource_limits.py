"""The proxy's own limits are the proxy's: started under a low open-files limit, running out of
descriptors is a 503 that says so, counted and logged, and no healthy backend is marked down."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from deploy.paths import REPO_ROOT
from tests.conftest import Service, free_port, start_service, wait_until
from tests.serving.test_http_protocol import Client, chat, request

pytestmark = pytest.mark.e2e

LIMIT = 64


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def more_open_files(pid: int, than: int) -> bool:
    return open_files(pid) > than


def limited_proxy(backend: Service, tmp_path: Path, soft: int, hard: int) -> Service:
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps({"models": [{"profile": "tiny-qwen3", "backends": [backend.base_url]}],
                                  "health_interval_seconds": 3600}))
    port = free_port()
    # prlimit execs the proxy in its own process: the pid is the proxy's.
    return start_service(["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-m", "serving", "--config",
                          str(config), "--port", str(port)], port, "/ready", tmp_path)


def test_the_soft_limit_is_raised_to_the_hard_limit(services: list[Service], upstream: Callable[..., Service],
                                                    tmp_path: Path) -> None:
    proxy = limited_proxy(upstream(), tmp_path, 128, 1024)
    services.append(proxy)
    assert "open files: soft limit raised from 128 to 1024 (hard limit 1024)" in proxy.log()
    limits = Path(f"/proc/{proxy.process.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == \
        [["1024", "1024"]]


def test_out_of_descriptors_is_the_proxys_503_and_the_backend_stays_up(
        services: list[Service], upstream: Callable[..., Service], tmp_path: Path) -> None:
    backend = upstream()
    proxy = limited_proxy(backend, tmp_path, LIMIT, LIMIT)
    services.append(proxy)
    pid = proxy.process.pid
    asking, watching = Client.connect(proxy), Client.connect(proxy)
    fillers: list[socket.socket] = []
    try:
        for client in (asking, watching):  # accepted and served: these connections are the proxy's now
            client.send(request("GET", "/health"))
            assert client.reply().status == 200
        while open_files(pid) < LIMIT:  # idle connections, one descriptor each, up to the limit
            count = open_files(pid)
            fillers.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=10))
            wait_until(functools.partial(more_open_files, pid, count), 10, "the proxy to accept a connection")
        assert open_files(pid) == LIMIT

        asking.send(request("POST", "/v1/chat/completions", chat(2)))
        reply = asking.reply()
        assert reply.status == 503
        error = reply.json()["error"]
        assert error["code"] == "proxy_overloaded"
        assert "out of file descriptors" in error["message"] and "the proxy's own limit" in error["message"]

        watching.send(request("GET", "/ready"))
        ready = watching.reply()
        assert ready.status == 200 and ready.json()["models"]["tiny-qwen3"]["backends"] == {backend.base_url: "up"}
        watching.send(request("GET", "/metrics"))
        metrics = watching.reply().body.decode()
        assert 'qwen_proxy_resource_exhausted_total{errno="EMFILE"} 1.0' in metrics
        assert f'qwen_proxy_backend_up{{backend="{backend.base_url}",model="tiny-qwen3"}} 1.0' in metrics
    finally:
        for sock in fillers:
            sock.close()
        asking.sock.close()
        watching.sock.close()
    assert proxy.log().count("out of file descriptors") == 1  # logged once per interval, not per request

    wait_until(lambda: open_files(pid) < LIMIT - 8, 30, "the proxy to close the idle connections")
    response = httpx.post(f"{proxy.base_url}/v1/chat/completions", timeout=30,
                          json={"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 2})
    assert response.status_code == 200
    assert httpx.get(f"{backend.base_url}/stats", timeout=10).json()["requests"] == 1  # only this one


def test_a_health_check_the_proxy_cannot_make_keeps_what_was_known(upstream: Callable[..., Service]) -> None:
    """Out of descriptors, a /health probe says nothing about the backend (None), and a request is
    the proxy's limit (LocalExhausted), not a refused connection."""
    backend = upstream()
    script = textwrap.dedent(f"""
        import asyncio, os, resource
        from yarl import URL
        from serving.upstream import LocalExhausted, Upstream

        async def main():
            base = URL("{backend.base_url}")
            up = Upstream()  # the backend is up (this one's kept-alive probe connection then closes)
            assert await up.healthy(base) is True
            await up.close()
            upstream = Upstream()
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, 4096))
            held = []
            try:
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            probe = await upstream.healthy(base)
            try:
                await upstream.post(base / "v1/chat/completions", b"{{}}", 5, fresh=True)
                sent = "sent"
            except LocalExhausted as exc:
                sent = exc.name
            for fd in held:
                os.close(fd)
            await upstream.close()
            print(probe, sent)

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "EMFILE"]
