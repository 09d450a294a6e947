"""Shared fixtures: ONE real vLLM server (tiny model, CPU) per test session, started through
the launcher exactly as a user would (`python -m deploy serve tiny-qwen3`), and one more for the
LoRA profile (`tiny-qwen3-lora`) when a test asks for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

# Re-exported (the `as` form says so to mypy): many tests import these two from here.
from deploy.health import http_ok as http_ok  # noqa: PLC0414
from deploy.health import wait_until as wait_until  # noqa: PLC0414
from deploy.loader import load_profile
from deploy.paths import GENERATED_MODELS_DIR, REPO_ROOT
from deploy.profile import Profile

STARTUP_TIMEOUT = 300.0

# No per-example deadline: with one, a property test's outcome would depend on how busy the machine is.
settings.register_profile("untimed", deadline=None)
settings.load_profile("untimed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    profile: Profile
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from deploy.tiny.model import generate

    return generate(GENERATED_MODELS_DIR / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir: Path) -> Path:
    from deploy.tiny.lora import generate

    return generate(GENERATED_MODELS_DIR / "tiny-lora", base=tiny_model_dir)


def interrupt(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Ctrl-C for a launcher still running (it stops what it started), then a kill after `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def launched_vllm(profile: str, args: list[str], log_dir: Path) -> Iterator[RunningServer]:
    """`python -m deploy serve <profile>` on a free port, until /health answers; SIGINT after."""
    port = free_port()
    log_path = log_dir / "vllm.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy", "serve", profile, "--port", str(port), *args],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
        )
    server = RunningServer(load_profile(profile), port, process, log_path)
    try:
        wait_until(
            lambda: http_ok(f"{server.base_url}/health") or process.poll() is not None,
            STARTUP_TIMEOUT, "vLLM /health",
        )
        if process.poll() is not None:
            raise RuntimeError(f"the launcher exited with {process.returncode}:\n{server.log_tail()}")
        yield server
    finally:
        interrupt(process, timeout=60)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Request logging lets tests prove what sampling parameters reached vLLM.
    with launched_vllm("tiny-qwen3", ["--set", "engine_args={enable-log-requests: true}"],
                       tmp_path_factory.mktemp("vllm")) as server:
        yield server


@pytest.fixture(scope="session")
def lora_vllm_server(tiny_lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """vLLM serving tiny-qwen3-lora: the tiny model as tiny-qwen3 (alias tiny) and its adapter as tiny-lora."""
    with launched_vllm("tiny-qwen3-lora", [], tmp_path_factory.mktemp("vllm-lora")) as server:
        yield server


@dataclass
class Service:
    """A server process the tests started (the proxy, a scripted upstream)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_service(argv: list[str], port: int, ready_path: str, log_dir: Path, timeout: float = 60,
                  host: str = "127.0.0.1") -> Service:
    """Start a server process and wait until `ready_path` answers 200 (or fail with its log)."""
    log_path = log_dir / f"service-{host}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    service = Service(process, port, log_path, host)
    try:
        wait_until(lambda: http_ok(service.base_url + ready_path) or process.poll() is not None, timeout,
                   f"{argv[2]} on port {port}")
    except TimeoutError:
        service.stop(signal.SIGKILL)
        raise
    if process.poll() is not None:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}:\n{service.log()}")
    return service


def start_proxy(args: list[str], log_dir: Path, port: int | None = None, ready_path: str = "/ready") -> Service:
    """`ready_path="/health"` for a proxy whose backends are meant to be down."""
    port = port or free_port()
    return start_service([sys.executable, "-m", "serving", *args, "--port", str(port)], port, ready_path, log_dir)


def start_scripted_upstream(log_dir: Path, port: int | None = None, delay_ms: float = 0,
                            close_before_response: bool = False, engine: str = "vllm") -> Service:
    port = port or free_port()
    argv = [sys.executable, "-m", "benchmarks.scripted_upstream", "--port", str(port), "--delay-ms", str(delay_ms),
            "--engine", engine]
    if close_before_response:
        argv.append("--close-before-response")
    return start_service(argv, port, "/health", log_dir)


@pytest.fixture(scope="session")
def proxy_server(vllm_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The proxy in front of the session's vLLM, as `make serve` runs it."""
    service = start_proxy(["--backend", f"tiny-qwen3={vllm_server.base_url}"], tmp_path_factory.mktemp("proxy"))
    yield service
    service.stop()
