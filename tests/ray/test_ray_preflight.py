"""The Ray path up to vLLM's door, on real Ray clusters with logical GPUs (vLLM's CPU build refuses
the Ray executor, so the launcher stops at the argv it would exec: --dry-run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from deploy.errors import LaunchError
from deploy.loader import load_profile
from deploy.paths import REPO_ROOT
from deploy.ray.preflight import NodeFacts, check
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.e2e


def deploy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env=env)


def ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server"], capture_output=True, text=True, check=False)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="class")
def two_gpu_head() -> Iterator[str]:
    """`deploy ray-head` on this node with 2 logical GPUs; `deploy ray-stop` at the end."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
    started = deploy("ray-head", "--port", str(port), "--num-gpus", "2", "--temp-dir", temp_dir)
    assert started.returncode == 0, started.stderr
    assert re.search(rf"Ray head started at [\d.]+:{port}", started.stdout), started.stdout
    address = f"127.0.0.1:{port}"
    yield address
    stopped = deploy("ray-stop")
    assert stopped.returncode == 0, stopped.stderr
    wait_until(lambda: not ray_processes(), 30, "Ray processes to exit")
    shutil.rmtree(temp_dir, ignore_errors=True)


class TestOneNodeTwoGpus:
    """`deploy ray-head`, then the launcher against it; `deploy ray-stop` at the end."""

    def test_ray_head_is_idempotent(self, two_gpu_head: str) -> None:
        port = two_gpu_head.split(":")[1]
        again = deploy("ray-head", "--port", port, "--num-gpus", "2")
        assert again.returncode == 0 and "already running" in again.stdout


    def test_two_gpus_pass_and_dry_run_prints_the_argv(self, two_gpu_head: str) -> None:
        result = deploy("serve", "qwq-32b", "--dry-run", "--json", "--ray-address", two_gpu_head)
        assert result.returncode == 0, result.stderr
        [replica] = json.loads(result.stdout)["replicas"]
        argv = replica["argv"]
        assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert replica["env"]["VLLM_HOST_IP"] and replica["gpus"] == 2
        assert "warning" not in result.stderr


    def test_replicas_times_tensor_must_fit_the_cluster(self, two_gpu_head: str) -> None:
        result = deploy("serve", "qwq-32b", "--dry-run", "--ray-address", two_gpu_head, "--replicas", "2")
        assert result.returncode == 2
        assert re.search(r"qwq-32b needs 4 GPUs \(2 replicas x tensor 2 x pipeline 1\); the cluster has 2 on 1 "
                         r"node\(s\): start a worker with make ray-worker HEAD=[\d.:]+ on another GPU node or pass "
                         r"--replicas 1$", result.stderr.strip()), result.stderr

    def test_replicas_fill_the_cluster_by_default(self, two_gpu_head: str) -> None:
        result = deploy("serve", "qwq-32b", "--set", "parallelism.tensor=1", "--dry-run", "--json",
                        "--ray-address", two_gpu_head, "--port", "9100")
        assert result.returncode == 0, result.stderr
        payload = json.loads(result.stdout)
        assert [(r["gpus"], r["port"]) for r in payload["replicas"]] == [(1, 9100), (1, 9101)]
        assert all(r["env"]["VLLM_HOST_IP"] for r in payload["replicas"])
        # Every replica's vLLM joins the cluster the preflight checked, not whichever "auto" finds.
        port = two_gpu_head.rsplit(":", 1)[1]
        assert all(r["env"]["RAY_ADDRESS"].endswith(f":{port}") for r in payload["replicas"])
        assert payload["proxy"]["backends"] == ["http://127.0.0.1:9100", "http://127.0.0.1:9101"]

    def test_gpu_ids_cannot_be_imposed_on_a_running_cluster(self, two_gpu_head: str) -> None:
        result = deploy("serve", "qwq-32b", "--gpus", "0,1", "--dry-run", "--ray-address", two_gpu_head)
        assert result.returncode == 2
        assert (f"--gpus 0,1: qwq-32b runs on the Ray cluster at {two_gpu_head}, which is already running and "
                "places GPUs itself: pass --replicas N instead") in result.stderr

    def test_status_shows_nodes_and_gpus(self, two_gpu_head: str) -> None:
        result = deploy("status", "--address", two_gpu_head)
        assert result.returncode == 0, result.stderr
        assert "1 node(s), GPUs 2 free of 2" in result.stdout and "head" in result.stdout




@pytest.fixture
def short_tmp() -> Iterator[str]:
    """Ray puts sockets in its temp dir: AF_UNIX paths must stay under 108 bytes."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_one_gpu_is_refused_and_nothing_is_left_running(short_tmp: str) -> None:
    port = free_port()
    assert deploy("ray-head", "--port", str(port), "--num-gpus", "1", "--temp-dir", short_tmp).returncode == 0
    try:
        result = deploy("serve", "qwq-32b", "--dry-run", "--ray-address", f"127.0.0.1:{port}")
    finally:
        deploy("ray-stop")
    assert result.returncode == 2
    assert re.search(r"qwq-32b needs 2 GPUs \(tensor 2 x pipeline 1\); the cluster has 1 on 1 node\(s\): start a "
                     rf"worker with make ray-worker HEAD=[\d.]+:{port}", result.stderr), result.stderr
    wait_until(lambda: not ray_processes(), 30, "Ray processes to exit")


def test_no_cluster_at_address_is_a_clear_error() -> None:
    result = deploy("serve", "qwq-32b", "--dry-run", "--ray-address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "no Ray cluster answers" in result.stderr and "make ray-head" in result.stderr


@pytest.fixture(scope="class")
def two_nodes() -> Iterator[str]:
    """Two Ray nodes with one logical GPU each (Ray's own multi-node test cluster)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_gpus": 1, "num_cpus": 1})
    cluster.add_node(num_gpus=1, num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


class TestTwoNodesOneGpuEach:
    def test_tensor_parallel_across_nodes_passes_with_a_warning(self, two_nodes: str) -> None:
        result = deploy("serve", "qwq-32b", "--dry-run", "--ray-address", two_nodes)
        assert result.returncode == 0, result.stderr
        assert "tensor parallel 2 crosses nodes (at most 1 GPUs per node)" in result.stderr
        assert "--set parallelism.tensor=1 --set parallelism.pipeline=2" in result.stderr


    def test_pipeline_across_nodes_passes_without_warning(self, two_nodes: str) -> None:
        result = deploy("serve", "qwq-32b", "--dry-run", "--ray-address", two_nodes,
                        "--set", "parallelism.tensor=1", "--set", "parallelism.pipeline=2")
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr
        assert "--tensor-parallel-size 1 --pipeline-parallel-size 2" in result.stdout




# ---- the verdict itself, on hand-made node facts ------------------------------------------------

def node(ip: str, gpus: int, version: str | None = "0.32.0", visible: bool | None = None) -> NodeFacts:
    return NodeFacts(ip=ip, gpus=gpus, vllm_version=version, model_visible=visible)


def test_version_mismatch_is_reported_per_node() -> None:
    with pytest.raises(LaunchError, match=r"vLLM differs between Ray nodes \(10.0.0.1: 0.32.0, 10.0.0.2: 0.31.0\)"):
        check(load_profile("qwq-32b"), "10.0.0.1:6379", [node("10.0.0.1", 1), node("10.0.0.2", 1, "0.31.0")])


def test_the_cluster_holds_replicas_of_tensor_x_pipeline() -> None:
    qwq = load_profile("qwq-32b")
    nodes = [node("10.0.0.1", 4), node("10.0.0.2", 4)]
    assert check(qwq, "a", nodes).replicas == 4  # none asked: as many as it holds
    assert check(qwq, "a", nodes, replicas=3).replicas == 3
    with pytest.raises(LaunchError, match=r"qwq-32b needs 10 GPUs \(5 replicas x tensor 2 x pipeline 1\); the "
                                          r"cluster has 8 on 2 node\(s\).* or pass --replicas 4$"):
        check(qwq, "a", nodes, replicas=5)


def test_a_head_started_on_some_gpus_hands_out_only_those(short_tmp: str) -> None:
    """serve --gpus on a Ray profile starts its head with those GPUs: Ray's workers see their ids."""
    import ray

    from deploy.ray import cluster as ray_cluster

    port = free_port()
    _, started = ray_cluster.start_head(ray_cluster.HeadOptions(port=port, num_gpus=2, gpu_ids=(5, 7),
                                                                temp_dir=short_tmp))
    try:
        assert started
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        try:
            seen = ray.get(ray.remote(num_gpus=2)(lambda: os.environ["CUDA_VISIBLE_DEVICES"]).remote(), timeout=120)
        finally:
            ray.shutdown()
    finally:
        deploy("ray-stop")
    assert sorted(seen.split(",")) == ["5", "7"]
    wait_until(lambda: not ray_processes(), 30, "Ray processes to exit")


def test_local_model_missing_on_a_node() -> None:
    profile = load_profile("tiny-qwen3", ["parallelism={tensor: 1, pipeline: 2, executor: ray}"])
    with pytest.raises(LaunchError, match=r"missing on node\(s\) 10.0.0.2"):
        check(profile, "a", [node("10.0.0.1", 1, visible=True), node("10.0.0.2", 1, visible=False)])
