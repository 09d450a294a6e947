"""`status`: the state file serve writes under .cache/run/, read back with each child probed now,
and the launcher's record of its layout and children."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deploy import run_state
from deploy.launch import record
from deploy.layout import Ask, Machine, plan_layout
from deploy.loader import load_profile
from deploy.paths import REPO_ROOT
from deploy.supervise import ChildState


def a_record(launcher_pid: int) -> run_state.ServeRecord:
    layout = plan_layout(load_profile("qwen3-4b-instruct-fp8"), Ask(gpus=(2, 5), port=9100, proxy_port=9000),
                         Machine(gpus=tuple(range(8))))
    states = [ChildState("vllm replica 0", 11, "healthy", 0, None), ChildState("vllm replica 1", 12, "restarting", 2, 137),
              ChildState("proxy", 13, "healthy", 0, None)]
    return record(layout, states, launcher_pid)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_record_holds_the_layout_and_the_supervisors_view() -> None:
    rec = a_record(42)
    assert [(r.index, r.gpus, r.where, r.port, r.pid, r.state, r.restarts, r.last_exit) for r in rec.replicas] == [
        (0, [2], "GPU 2", 9100, 11, "healthy", 0, None), (1, [5], "GPU 5", 9101, 12, "restarting", 2, 137)]
    assert rec.proxy == run_state.ProxyRecord(port=9000, pid=13, state="healthy")
    assert (rec.profile, rec.served_model_name) == ("qwen3-4b-instruct-fp8", "qwen3-4b-instruct")


def test_status_probes_each_child_now(tmp_path: Path) -> None:
    run_state.write(a_record(os.getpid()), tmp_path)
    answering = {"http://127.0.0.1:9100/health", "http://127.0.0.1:9000/ready"}
    text = run_state.describe(run_state.read_all(tmp_path), probe=answering.__contains__)
    lines = text.splitlines()
    assert lines[0] == f"qwen3-4b-instruct-fp8: 2 replica(s), launcher pid {os.getpid()}"
    assert lines[1] == "  proxy http://127.0.0.1:9000 (pid 13): ready, model qwen3-4b-instruct"
    assert lines[2].split() == ["replica", "share", "port", "pid", "health", "supervisor", "restarts"]
    assert lines[3].split() == ["0", "GPU", "2", "9100", "11", "ok", "healthy", "0"]
    assert lines[4].split()[:8] == ["1", "GPU", "5", "9101", "12", "no", "answer", "restarting"]
    assert lines[4].endswith("2 (last exit status 137)")
    [data] = run_state.as_json(run_state.read_all(tmp_path), probe=answering.__contains__)
    assert data["running"] is True and data["proxy"]["answers"] is True
    assert [r["answers"] for r in data["replicas"]] == [True, False]


def test_a_gone_launchers_file_is_stale_and_the_next_serve_removes_it(tmp_path: Path) -> None:
    gone, alive = dead_pid(), os.getpid()
    run_state.write(a_record(gone), tmp_path)
    run_state.write(a_record(alive), tmp_path)
    text = run_state.describe(run_state.read_all(tmp_path), probe=lambda url: False)
    assert (f"launcher pid {gone} is gone (killed before it could clean up): {tmp_path}/serve-{gone}.json is stale; "
            "what it started may still listen on port(s) 9100, 9101") in text
    run_state.remove_stale(tmp_path)
    assert [f.record.launcher_pid for f in run_state.read_all(tmp_path) if f.record] == [alive]
    run_state.remove(alive, tmp_path)
    assert run_state.read_all(tmp_path) == []
    assert run_state.describe([]) == "serve: nothing running here (no launcher state in .cache/run/)"


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "serve-7.json").write_text('{"launcher_pid": "x"}')
    [found] = run_state.read_all(tmp_path)
    assert found.record is None and found.problem is not None and "launcher_pid" in found.problem
    assert run_state.describe([found]).startswith(f"{tmp_path}/serve-7.json is not a serve state file: ")


def test_replica_ports_are_a_running_serves_of_that_profile(tmp_path: Path) -> None:
    """What `make bench` and `make observe` scrape: every replica of the profile's running serve."""
    run_state.write(a_record(os.getpid()), tmp_path)
    run_state.write(a_record(dead_pid()), tmp_path)  # a launcher that is gone: its ports are not served
    found = run_state.read_all(tmp_path)
    assert run_state.replica_ports("qwen3-4b-instruct-fp8", found) == [9100, 9101]
    assert run_state.replica_ports("qwq-32b", found) == []


def test_status_command_shows_this_launcher() -> None:
    """Through the CLI, from the real run directory (a record of this test process, removed after)."""
    path = run_state.write(a_record(os.getpid()))
    try:
        text = subprocess.run([sys.executable, "-m", "deploy", "status"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120, check=True).stdout
        as_json = subprocess.run([sys.executable, "-m", "deploy", "status", "--json"], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=120, check=True).stdout
        ports = [subprocess.run([sys.executable, "-m", "deploy", "status", "--ports", profile], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120, check=True).stdout
                 for profile in ("qwen3-4b-instruct-fp8", "qwq-32b")]
    finally:
        path.unlink()
    assert f"qwen3-4b-instruct-fp8: 2 replica(s), launcher pid {os.getpid()}" in text
    assert "Ray: no cluster on this node" in text or "Ray cluster " in text
    mine = [d for d in json.loads(as_json) if d.get("launcher_pid") == os.getpid()]
    assert [r["port"] for r in mine[0]["replicas"]] == [9100, 9101]
    assert ports == ["9100 9101\n", f"{load_profile('qwq-32b').port}\n"]  # none running: the profile's port
