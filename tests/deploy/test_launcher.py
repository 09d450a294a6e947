"""The launcher refuses clearly before starting anything, and supervises what it starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from deploy.paths import MODELS_DIR, REPO_ROOT
from tests.conftest import free_port, http_ok, wait_until


def run_deploy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, **(env or {})}, timeout=120,
    )


def test_unknown_profile_lists_known() -> None:
    result = run_deploy("serve", "qwen-huge")
    assert result.returncode == 2
    assert "unknown profile 'qwen-huge'" in result.stderr and "tiny-qwen3" in result.stderr


def test_port_in_use(tiny_model_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_deploy("serve", "tiny-qwen3", "--port", str(port))
    assert result.returncode == 2
    assert f"port {port} is in use" in result.stderr and "PORT=" in result.stderr


def test_missing_model_path(tmp_path: Path) -> None:
    data = yaml.safe_load((MODELS_DIR / "tiny-qwen3.yaml").read_text())
    data.update(name="gone", model=str(tmp_path / "no-such-model"))
    del data["generator"]
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_deploy("serve", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert f"no model at {tmp_path / 'no-such-model'}" in result.stderr


def test_not_enough_gpus() -> None:
    result = run_deploy("serve", "qwen3-4b-instruct-fp8", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "qwen3-4b-instruct-fp8 needs 1 GPU(s) (tensor 1 x pipeline 1); 0 visible" in result.stderr
    assert "MODEL=tiny-qwen3" in result.stderr


def test_dry_run_prints_the_argv_and_starts_nothing(tiny_model_dir: Path) -> None:
    result = run_deploy("serve", "tiny-qwen3", "--dry-run", "--port", "8199")
    assert result.returncode == 0, result.stderr
    payload, _ = json.JSONDecoder().raw_decode(result.stdout)
    assert payload["argv"][1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert payload["argv"][payload["argv"].index("--port") + 1] == "8199"
    assert payload["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


SUPERVISED = textwrap.dedent("""
    import sys
    from deploy.supervise import Child, Supervisor
    port = int(sys.argv[1])
    child = Child("web", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                  env={}, health_url=f"http://127.0.0.1:{port}/")
    sys.exit(Supervisor([child], startup_timeout=60).run(on_ready=lambda: print("READY", flush=True)))
""")


def test_supervisor_forwards_sigint_and_exits_with_the_childs_status(tmp_path: Path) -> None:
    """A stand-in child (http.server), not vLLM: this tests the supervision, not the engine."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED, str(port)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "READY"
    assert http_ok(f"http://127.0.0.1:{port}/")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0  # http.server exits 0 on SIGINT; the launcher passes it on
    wait_until(lambda: not http_ok(f"http://127.0.0.1:{port}/"), 10, "the child to be gone")


def test_supervisor_reports_a_child_that_dies_before_healthy() -> None:
    code = textwrap.dedent("""
        import sys
        from deploy.errors import LaunchError
        from deploy.supervise import Child, Supervisor
        child = Child("broken", [sys.executable, "-c", "raise SystemExit(3)"], env={},
                      health_url="http://127.0.0.1:9/health")
        try:
            Supervisor([child], startup_timeout=60).run(on_ready=lambda: None)
        except LaunchError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60)
    assert "broken exited with status 3 before it was healthy" in result.stdout
