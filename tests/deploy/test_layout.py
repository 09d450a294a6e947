"""How `serve` lays a profile out: replicas (GPUs or cores, port, env each) and the proxy in front,
for the multiprocessing executor, Ray and the CPU, and the refusals that name the numbers."""

from __future__ import annotations

import pytest

from deploy.errors import LaunchError
from deploy.layout import Ask, Machine, Replica, plan_layout, ray_replicas, split
from deploy.loader import load_profile
from deploy.render import server_command

EIGHT = Machine(gpus=tuple(range(8)), cores=(0, 1))
CPU_TWO = Machine(cores=(0, 1))


def port_of(replica: Replica) -> str:
    argv = replica.command.argv
    return argv[argv.index("--port") + 1]


# ---- vLLM's multiprocessing executor: GPUs by id ------------------------------------------------

def test_one_gpu_model_fills_every_visible_gpu() -> None:
    layout = plan_layout(load_profile("qwen3-4b-instruct-fp8"), Ask(), EIGHT)
    assert [r.gpus for r in layout.replicas] == [(i,) for i in range(8)]
    assert [r.port for r in layout.replicas] == list(range(8100, 8108))
    assert [port_of(r) for r in layout.replicas] == [str(p) for p in range(8100, 8108)]
    assert [r.command.env["CUDA_VISIBLE_DEVICES"] for r in layout.replicas] == [str(i) for i in range(8)]
    assert layout.warnings == ()
    # Everything else is the profile's own command, port aside.
    expected = server_command(load_profile("qwen3-4b-instruct-fp8"), port=8103).argv
    assert layout.replicas[3].command.argv == expected


def test_tensor_two_takes_consecutive_pairs() -> None:
    layout = plan_layout(load_profile("qwq-32b-short"), Ask(), EIGHT)
    assert [r.command.env["CUDA_VISIBLE_DEVICES"] for r in layout.replicas] == ["0,1", "2,3", "4,5", "6,7"]
    assert [r.where for r in layout.replicas][:1] == ["GPUs 0,1"]


def test_gpus_and_replicas_choose_the_share() -> None:
    layout = plan_layout(load_profile("qwq-32b-short"), Ask(gpus=(6, 7, 2, 3), replicas=1), EIGHT)
    assert [r.gpus for r in layout.replicas] == [(6, 7)]
    assert layout.warnings == ()  # fewer replicas were asked for: the idle GPUs are meant


def test_an_odd_gpu_is_left_idle_with_a_warning() -> None:
    layout = plan_layout(load_profile("qwq-32b-short"), Ask(gpus=(0, 1, 2)), EIGHT)
    assert len(layout.replicas) == 1
    assert layout.warnings == ("GPU(s) 2 left idle: qwq-32b-short takes 2 per replica (tensor 2 x pipeline 1)",)


def test_the_callers_device_order_is_kept() -> None:
    layout = plan_layout(load_profile("qwen3-4b-instruct-fp8"), Ask(replicas=1),
                         Machine(gpus=(0,), device_order="FASTEST_FIRST"))
    assert layout.replicas[0].command.env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_uuids_pass_through_as_given() -> None:
    uuid = "GPU-8f0c1a52-6c1e-4d1e-9a7a-0b1d2c3e4f50"
    layout = plan_layout(load_profile("qwen3-4b-instruct-fp8"), Ask(), Machine(gpus=(uuid,)))
    assert layout.replicas[0].command.env["CUDA_VISIBLE_DEVICES"] == uuid


@pytest.mark.parametrize(("profile", "ask", "machine", "message"), [
    ("qwen3-4b-instruct-fp8", Ask(), Machine(),
     ("qwen3-4b-instruct-fp8 needs 1 GPU(s) (tensor 1 x pipeline 1); 0 visible. On a machine without an NVIDIA "
      "GPU use MODEL=tiny-qwen3")),
    ("qwq-32b-short", Ask(), Machine(gpus=(0,)), "qwq-32b-short needs 2 GPU(s) (tensor 2 x pipeline 1); 1 visible."),
    ("qwq-32b-short", Ask(gpus=(3,)), EIGHT, "qwq-32b-short needs 2 GPU(s) (tensor 2 x pipeline 1); --gpus 3 gives 1"),
    ("qwq-32b-short", Ask(replicas=5), EIGHT,
     ("qwq-32b-short: --replicas 5 needs 10 GPUs (5 replicas x tensor 2 x pipeline 1); 8 visible, which hold 4: "
      "pass --replicas 4 or name more GPUs")),
    ("qwen3-4b-instruct-fp8", Ask(gpus=(0, 1, 0)), EIGHT, "--gpus 0,1,0: GPU 0 named twice"),
    ("qwen3-4b-instruct-fp8", Ask(gpus=(7, 8)), EIGHT,
     "--gpus 7,8: GPU 8 is not visible here (visible: 0,1,2,3,4,5,6,7)"),
])
def test_gpu_refusals_name_the_numbers(profile: str, ask: Ask, machine: Machine, message: str) -> None:
    with pytest.raises(LaunchError) as err:
        plan_layout(load_profile(profile), ask, machine)
    assert message in str(err.value)


def test_a_dry_run_takes_the_gpus_as_given() -> None:
    layout = plan_layout(load_profile("qwen3-4b-instruct-fp8"), Ask(gpus=(4, 5)), Machine(), dry_run=True)
    assert [r.gpus for r in layout.replicas] == [(4,), (5,)]


# ---- ports and the proxy ------------------------------------------------------------------------

def test_the_proxy_fronts_several_replicas_by_default() -> None:
    profile = load_profile("qwen3-4b-instruct-fp8")
    two = plan_layout(profile, Ask(gpus=(0, 1), port=9000), EIGHT)
    assert two.proxy_port == 8000
    argv = two.proxy_argv()
    assert argv is not None and argv[1:3] == ["-m", "serving"] and argv[-4:] == [
        "--backend", "qwen3-4b-instruct-fp8=http://127.0.0.1:9000,http://127.0.0.1:9001", "--port", "8000"]
    assert plan_layout(profile, Ask(gpus=(0, 1), no_proxy=True), EIGHT).proxy_port is None
    assert plan_layout(profile, Ask(gpus=(0, 1), proxy_port=7000), EIGHT).proxy_port == 7000
    # One replica: a proxy only when asked for (as before replicas existed).
    assert plan_layout(profile, Ask(gpus=(0,)), EIGHT).proxy_port is None
    assert plan_layout(profile, Ask(gpus=(0,), proxy_port=7000), EIGHT).proxy_port == 7000


def test_port_refusals() -> None:
    profile = load_profile("qwen3-4b-instruct-fp8")
    with pytest.raises(LaunchError, match=r"--proxy-port 8102 is replica 2's port \(replicas use 8100-8107\)"):
        plan_layout(profile, Ask(proxy_port=8102), EIGHT)
    with pytest.raises(LaunchError, match=r"--port 65530: 8 replicas need ports 65530-65537, beyond 65535"):
        plan_layout(profile, Ask(port=65530), EIGHT)


def test_json_shape() -> None:
    layout = plan_layout(load_profile("qwen3-4b-instruct-fp8"), Ask(gpus=(2, 3)), EIGHT)
    payload = layout.as_json()
    assert payload["proxy"] == {"port": 8000, "backends": ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]}
    assert payload["replicas"][1] == {"gpus": [3], "port": 8101, "env": layout.replicas[1].command.env,
                                      "argv": layout.replicas[1].command.argv}
    assert plan_layout(load_profile("qwen3-4b-instruct-fp8"), Ask(gpus=(2,)), EIGHT).as_json()["proxy"] is None


# ---- Ray: a count per replica, placed by Ray ---------------------------------------------------

def test_ray_replicas_hold_a_count_and_the_preflights_env() -> None:
    env = {"VLLM_HOST_IP": "10.0.0.1"}
    layout = plan_layout(load_profile("qwq-32b"), Ask(), Machine(), ray_replica_count=3, ray_env=env)
    assert [r.gpus for r in layout.replicas] == [2, 2, 2]
    assert all(r.command.env == env for r in layout.replicas)
    assert layout.replicas[0].where == "2 GPU(s) placed by Ray"


def test_what_a_ray_profile_asks_for() -> None:
    qwq = load_profile("qwq-32b")
    assert ray_replicas(qwq, Ask()) is None  # as many as the cluster holds: the preflight decides
    assert ray_replicas(qwq, Ask(replicas=3)) == 3
    assert ray_replicas(qwq, Ask(gpus=tuple(range(8)))) == 4
    assert ray_replicas(qwq, Ask(gpus=tuple(range(8)), replicas=2)) == 2
    with pytest.raises(LaunchError, match=r"--replicas 5 needs 10 GPUs \(5 replicas x tensor 2 x pipeline 1\); "
                                          r"--gpus 0,1,2,3,4,5,6,7 gives 8, which hold 4"):
        ray_replicas(qwq, Ask(gpus=tuple(range(8)), replicas=5))
    with pytest.raises(LaunchError, match=r"qwq-32b needs 2 GPU\(s\) \(tensor 2 x pipeline 1\); --gpus 0 gives 1"):
        ray_replicas(qwq, Ask(gpus=(0,)))


# ---- the CPU: cores split between replicas -----------------------------------------------------

def test_two_replicas_on_two_cores_take_one_each() -> None:
    layout = plan_layout(load_profile("tiny-qwen3"), Ask(replicas=2), CPU_TWO)
    envs = [r.command.env for r in layout.replicas]
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0", "1"]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["1", "1"]
    assert all(e["VLLM_CPU_KVCACHE_SPACE"] == "1" and "CUDA_VISIBLE_DEVICES" not in e for e in envs)
    assert [r.where for r in layout.replicas] == ["CPU core 0", "CPU core 1"]
    assert layout.proxy_port == 8000


def test_uneven_cores_go_to_the_first_replicas() -> None:
    layout = plan_layout(load_profile("tiny-qwen3"), Ask(replicas=2), Machine(cores=(2, 3, 5, 8, 9)))
    envs = [r.command.env for r in layout.replicas]
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["2,3,5", "8,9"]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["3", "2"]


def test_a_cpu_replica_of_two_ranks_binds_each_rank() -> None:
    profile = load_profile("tiny-qwen3", ["parallelism.tensor=2"])
    layout = plan_layout(profile, Ask(replicas=2), Machine(cores=(0, 1, 2, 3)))
    assert [r.command.env["VLLM_CPU_OMP_THREADS_BIND"] for r in layout.replicas] == ["0|1", "2|3"]


def test_one_cpu_replica_keeps_the_profiles_threading() -> None:
    layout = plan_layout(load_profile("tiny-qwen3"), Ask(), CPU_TWO)
    [replica] = layout.replicas
    assert replica.cores is None and replica.command.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert layout.proxy_port is None


def test_cpu_refusals() -> None:
    tiny = load_profile("tiny-qwen3")
    with pytest.raises(LaunchError, match=r"tiny-qwen3: 3 replicas need 3 CPU core\(s\) \(one per replica\); "
                                          r"this process may use 2 \(cores 0,1\): pass --replicas 2"):
        plan_layout(tiny, Ask(replicas=3), CPU_TWO)
    with pytest.raises(LaunchError, match=r"--gpus: tiny-qwen3 runs on the CPU \(device: cpu\)"):
        plan_layout(tiny, Ask(gpus=(0,)), CPU_TWO, dry_run=True)


def test_split() -> None:
    assert split([1, 2, 3, 4, 5, 6, 7], 3) == [[1, 2, 3], [4, 5], [6, 7]]
    assert split([0, 1], 2) == [[0], [1]]
