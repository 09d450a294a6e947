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
from typing import Any

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
    result = run_deploy("serve", "tiny-qwen3", "--dry-run", "--json", "--port", "8199")
    assert result.returncode == 0, result.stderr
    [replica] = json.loads(result.stdout)["replicas"]
    assert replica["argv"][1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert replica["argv"][replica["argv"].index("--port") + 1] == "8199"
    # One CPU replica keeps the profile's own threading.
    assert replica["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    assert http_ok("http://127.0.0.1:8199/health") is False


def dry_run_json(*args: str) -> dict[str, Any]:
    result = run_deploy("serve", *args, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    payload: dict[str, Any] = json.loads(result.stdout)
    assert set(payload) == {"replicas", "proxy"}
    for replica in payload["replicas"]:
        assert set(replica) == {"gpus", "port", "env", "argv"}
        assert replica["argv"][replica["argv"].index("--port") + 1] == str(replica["port"])
    return payload


def test_eight_gpus_hold_eight_one_gpu_replicas_behind_the_proxy() -> None:
    """The issue's done-when: GPUs named with --gpus need not be visible for a dry run."""
    payload = dry_run_json("qwen3-4b-instruct-fp8", "--gpus", "0,1,2,3,4,5,6,7")
    replicas = payload["replicas"]
    assert [r["gpus"] for r in replicas] == [[i] for i in range(8)]
    assert [r["port"] for r in replicas] == list(range(8100, 8108))
    assert [r["env"]["CUDA_VISIBLE_DEVICES"] for r in replicas] == [str(i) for i in range(8)]
    assert all(r["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" for r in replicas)
    assert payload["proxy"] == {"port": 8000, "backends": [f"http://127.0.0.1:{p}" for p in range(8100, 8108)]}


def test_qwq_on_eight_gpus_is_four_ray_replicas_of_two() -> None:
    """A Ray profile's GPUs are placed by Ray: each replica holds a count, not ids."""
    payload = dry_run_json("qwq-32b", "--gpus", "0,1,2,3,4,5,6,7")
    replicas = payload["replicas"]
    assert [r["gpus"] for r in replicas] == [2, 2, 2, 2]
    for r in replicas:
        argv = r["argv"]
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
        assert "CUDA_VISIBLE_DEVICES" not in r["env"]
    assert len(payload["proxy"]["backends"]) == 4


def test_dry_run_text_is_one_block_per_replica_then_the_proxy() -> None:
    result = run_deploy("serve", "qwq-32b-short", "--gpus", "0,1,2,3", "--port", "9100", "--dry-run")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [
        "# replica 0 of 2: GPUs 0,1, port 9100", "# replica 1 of 2: GPUs 2,3, port 9101",
        "# proxy: port 8000, prefix affinity over 2 replica(s)"]
    assert "CUDA_VISIBLE_DEVICES=2,3 " in blocks[1] and "--port 9101" in blocks[1]
    assert blocks[2].splitlines()[1].endswith(
        "-m serving --backend qwq-32b-short=http://127.0.0.1:9100,http://127.0.0.1:9101 --port 8000")


def test_gpus_that_are_not_visible_are_refused_outside_a_dry_run() -> None:
    result = run_deploy("serve", "qwen3-4b-instruct-fp8", "--gpus", "0,1", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "--gpus 0,1: GPU 0,1 is not visible here (visible: none)" in result.stderr


def test_more_replicas_than_the_gpus_hold_names_the_numbers() -> None:
    result = run_deploy("serve", "qwq-32b-short", "--gpus", "0,1,2,3,4", "--replicas", "3", "--dry-run")
    assert result.returncode == 2
    assert ("qwq-32b-short: --replicas 3 needs 6 GPUs (3 replicas x tensor 2 x pipeline 1); --gpus 0,1,2,3,4 "
            "gives 5, which hold 2: pass --replicas 2") in result.stderr


def test_a_busy_replica_port_is_named(tiny_model_dir: Path) -> None:
    """The second replica's port (base + 1) is taken: refused before anything starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        result = run_deploy("serve", "tiny-qwen3", "--replicas", "2", "--port", str(busy - 1),
                            "--proxy-port", str(free_port()))
    assert result.returncode == 2
    assert f"port {busy} (replica 1; the 2 replicas use {busy - 1}-{busy}) is in use" in result.stderr


def test_json_needs_dry_run() -> None:
    result = run_deploy("serve", "tiny-qwen3", "--json")
    assert result.returncode == 2 and "--json goes with --dry-run" in result.stderr


def test_make_serve_passes_replicas_and_gpus() -> None:
    """`make -n` prints the command without running it."""
    result = subprocess.run(["make", "-n", "serve", "MODEL=qwen3-4b-instruct-fp8", "REPLICAS=2", "GPUS=0,1",
                             "PROXY_PORT=9000"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "-m deploy serve qwen3-4b-instruct-fp8 --replicas 2 --gpus 0,1 --proxy-port 9000" in result.stdout
    vllm_only = subprocess.run(["make", "-n", "serve-vllm", "MODEL=tiny-qwen3", "REPLICAS=2"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=True)
    assert "-m deploy serve tiny-qwen3 --replicas 2 --no-proxy" in vllm_only.stdout


SUPERVISED = textwrap.dedent("""
    import sys
    from deploy.child import Child
    from deploy.supervise import Supervisor
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
        from deploy.child import Child
        from deploy.supervise import Supervisor
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
