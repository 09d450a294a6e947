"""deploy/venv_probe.py: what a probe in another venv answers, and each way it can fail to."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deploy.errors import CheckError
from deploy.venv_probe import pinned, run_json

PYTHON = Path(sys.executable)


def probe(tmp_path: Path, source: str) -> Path:
    script = tmp_path / "probe.py"
    script.write_text(source)
    return script


def ask(script: Path, **kwargs: object) -> dict[str, object]:
    return run_json(PYTHON, script, what="the test probe", rebuild="make test-venv", error=CheckError,
                    timeout=60, **kwargs)  # type: ignore[arg-type]


def test_argv_stdin_and_env_reach_the_probe_and_its_object_comes_back(tmp_path: Path) -> None:
    script = probe(tmp_path, "import json, os, sys\n"
                             "print(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read(), "
                             "'env': os.environ.get('PROBE_TEST')}))\n")
    assert ask(script, argv=["--a", "b c"], stdin='{"jobs": []}', env={"PROBE_TEST": "x"}) == {
        "argv": ["--a", "b c"], "stdin": '{"jobs": []}', "env": "x"}


def test_no_json_names_the_probe_its_exit_its_last_words_and_the_rebuild(tmp_path: Path) -> None:
    script = probe(tmp_path, "import sys\nprint('not json')\nsys.stderr.write('ImportError: no pandas\\n')\n"
                             "sys.exit(3)\n")
    with pytest.raises(CheckError, match=r"^the test probe failed \(exit 3\) without an answer: "
                                          r"ImportError: no pandas; rebuild its venv with `make test-venv`$"):
        ask(script)


def test_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckError, match="^the test probe answered list, not an object$"):
        ask(probe(tmp_path, "print('[1, 2]')\n"))


def test_a_probe_that_never_answers_is_given_up(tmp_path: Path) -> None:
    script = probe(tmp_path, "import time\ntime.sleep(600)\n")
    with pytest.raises(CheckError, match=r"^the test probe did not answer within 1 s$"):
        run_json(PYTHON, script, what="the test probe", rebuild="make test-venv", error=CheckError, timeout=1)


def test_the_pinned_version_is_read_from_the_line_that_names_it(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# aiconfigurator==0.0.1 in a comment is not a pin\naiconfigurator-core==0.12.0\n"
                            "aiconfigurator==0.12.0\n")
    assert pinned(requirements, "aiconfigurator") == "0.12.0"
    assert pinned(requirements, "aiconfigurator-core") == "0.12.0"
    with pytest.raises(RuntimeError, match="no 'sglang==<version>' line"):
        pinned(requirements, "sglang")
