"""What `serve` is running here, for `status`: one small JSON file per launcher under .cache/run/,
rewritten as its children change (started, healthy, died, restarted) and removed at exit.

A launcher killed outright leaves its file behind: `status` says so (its pid is gone), and the
next `serve` removes such files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deploy.health import http_ok
from deploy.paths import CACHE_DIR, shown
from deploy.typed_config import Strict, describe_errors

RUN_DIR = CACHE_DIR / "run"
PREFIX = "serve-"


class ReplicaRecord(Strict):
    index: int
    where: str  # its share of the machine: "GPUs 0,1", "2 GPU(s) placed by Ray", "CPU core 1"
    gpus: list[int | str] | int
    port: int
    pid: int | None
    state: str  # the supervisor's: starting, healthy, unhealthy, restarting, failed, stopped
    restarts: int = 0
    last_exit: int | None = None


class ProxyRecord(Strict):
    port: int
    pid: int | None
    state: str


class ServeRecord(Strict):
    launcher_pid: int
    profile: str
    served_model_name: str
    replicas: list[ReplicaRecord]
    proxy: ProxyRecord | None


def state_path(launcher_pid: int, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / f"{PREFIX}{launcher_pid}.json"


def write(record: ServeRecord, run_dir: Path = RUN_DIR) -> Path:
    """Replace the launcher's file at once (a reader never sees half of it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = state_path(record.launcher_pid, run_dir)
    partial = path.with_suffix(".tmp")
    partial.write_text(record.model_dump_json(indent=2) + "\n")
    os.replace(partial, path)
    return path


def remove(launcher_pid: int, run_dir: Path = RUN_DIR) -> None:
    state_path(launcher_pid, run_dir).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@dataclass(frozen=True)
class Found:
    path: Path
    record: ServeRecord | None  # None: unreadable
    problem: str | None = None

    @property
    def stale(self) -> bool:
        return self.record is not None and not pid_alive(self.record.launcher_pid)


def read_all(run_dir: Path = RUN_DIR) -> list[Found]:
    found = []
    for path in sorted(run_dir.glob(f"{PREFIX}*.json")):
        try:
            found.append(Found(path, ServeRecord.model_validate_json(path.read_text())))
        except OSError as exc:
            found.append(Found(path, None, f"cannot be read ({exc.strerror})"))
        except ValidationError as exc:
            found.append(Found(path, None, f"is not a serve state file: {describe_errors(exc)}"))
    return found


def replica_ports(profile: str, found: list[Found]) -> list[int]:
    """The engine ports of the replicas a running `serve` of this profile started (none: [])."""
    return [replica.port for item in found if item.record is not None and not item.stale
            and item.record.profile == profile for replica in item.record.replicas]


def remove_stale(run_dir: Path = RUN_DIR) -> None:
    """Files of launchers that are gone (killed without their cleanup)."""
    for found in read_all(run_dir):
        if found.stale:
            found.path.unlink(missing_ok=True)


Probe = Callable[[str], bool]


def _probe(url: str) -> bool:
    return http_ok(url, timeout=1.0)


def as_json(found: list[Found], probe: Probe = _probe) -> list[dict[str, Any]]:
    """`status --json`: each launcher's record, with `running` (its launcher) and each child's
    `answers` (its /health, the proxy's /ready, probed now)."""
    out = []
    for item in found:
        if item.record is None:
            out.append({"file": shown(item.path), "error": item.problem})
            continue
        data = item.record.model_dump()
        data["running"] = not item.stale
        for replica in data["replicas"]:
            replica["answers"] = probe(f"http://127.0.0.1:{replica['port']}/health")
        if data["proxy"] is not None:
            data["proxy"]["answers"] = probe(f"http://127.0.0.1:{data['proxy']['port']}/ready")
        out.append(data)
    return out


def describe(found: list[Found], probe: Probe = _probe) -> str:
    """`status`: per launcher, the proxy and a table of replicas (share, port, pid, health)."""
    if not found:
        return "serve: nothing running here (no launcher state in .cache/run/)"
    blocks = []
    for item in found:
        record = item.record
        if record is None:
            blocks.append(f"{shown(item.path)} {item.problem}: remove it")
            continue
        head = f"{record.profile}: {len(record.replicas)} replica(s), launcher pid {record.launcher_pid}"
        if item.stale:
            ports = ", ".join(str(r.port) for r in record.replicas)
            blocks.append(f"{head} is gone (killed before it could clean up): {shown(item.path)} is stale; "
                          f"what it started may still listen on port(s) {ports}")
            continue
        lines = [head]
        if record.proxy is not None:
            ready = "ready" if probe(f"http://127.0.0.1:{record.proxy.port}/ready") else "not ready"
            lines.append(f"  proxy http://127.0.0.1:{record.proxy.port} (pid {record.proxy.pid}): {ready}, "
                         f"model {record.served_model_name}")
        rows = [("replica", "share", "port", "pid", "health", "supervisor", "restarts")]
        for r in record.replicas:
            health = "ok" if probe(f"http://127.0.0.1:{r.port}/health") else "no answer"
            restarts = str(r.restarts) + (f" (last exit status {r.last_exit})" if r.last_exit is not None else "")
            rows.append((str(r.index), r.where, str(r.port), str(r.pid or "-"), health, r.state, restarts))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
                  for row in rows]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def dumps(found: list[Found], probe: Probe = _probe) -> str:
    return json.dumps(as_json(found, probe), indent=2)
