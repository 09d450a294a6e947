"""The proxy's config file: every mistake is refused with the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.config import DEFAULT_FORWARD_PATHS, ConfigError, build_routes, load_config

MODEL = {"profile": "tiny-qwen3", "backends": ["http://127.0.0.1:8100"]}


def config_file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data) if data is not None else "")
    return path


def refusal(tmp_path: Path, data: object) -> str:
    path = config_file(tmp_path, data)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: "), message
    return message


def test_the_shipped_config_loads_with_documented_defaults() -> None:
    config = load_config(Path("configs/proxy.yaml"))
    assert config.forward_paths == list(DEFAULT_FORWARD_PATHS)
    assert config.retries.max_attempts == 3
    assert config.models[0].routing == "prefix_affinity"


def test_empty_file(tmp_path: Path) -> None:
    assert "expected a mapping with at least `models:`" in refusal(tmp_path, None)


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    message = refusal(tmp_path, {"models": [{**MODEL, "backendz": []}]})
    assert "models[0].backendz: unknown key" in message


@pytest.mark.parametrize(("data", "expected"), [
    ({"models": [{**MODEL, "backends": ["127.0.0.1:8100"]}]},
     "models[0].backends[0]: a backend must be an http:// or https:// URL (got '127.0.0.1:8100')"),
    ({"models": [{**MODEL, "backends": ["http://a:1", "http://b:99999"]}]},
     "models[0].backends[1]: the port must be a number from 1 to 65535 (got 'http://b:99999')"),
    ({"models": [{**MODEL, "backends": ["http://b:0"]}]}, "models[0].backends[0]: the port must be a number"),
    ({"models": [{**MODEL, "backends": ["http://b:x"]}]}, "models[0].backends[0]: the port must be a number"),
    ({"models": [{**MODEL, "backends": ["http://:8000"]}]}, "models[0].backends[0]: the URL names no host"),
    ({"models": [MODEL], "forward_paths": ["/v1/x?y=1"]}, "forward_paths: forward path '/v1/x?y=1' must be a plain path"),
    ({"models": [MODEL], "forward_paths": ["/admin"]}, "forward_paths: forward path '/admin' must be a plain path"),
    ({"models": [MODEL], "forward_paths": ["/v1/%2e%2e/x"]}, "forward path '/v1/%2e%2e/x' must be a plain path"),
    ({"models": [MODEL], "retries": {"max_attempts": 0}}, "retries.max_attempts: Input should be greater than"),
    ({"models": [{**MODEL, "routing": "random"}]}, "models[0].routing: Input should be 'prefix_affinity' or"),
])
def test_bad_values_name_the_key(tmp_path: Path, data: object, expected: str) -> None:
    assert expected in refusal(tmp_path, data)


def hub_config(tmp_path: Path, first: bool | None = None, second: bool | None = None) -> Path:
    models: list[dict[str, object]] = [{"profile": "qwq-32b", "backends": ["http://127.0.0.1:1"]},
              {"profile": "qwq-32b-short", "backends": ["http://127.0.0.1:2"]}]
    for model, said in zip(models, (first, second), strict=True):
        if said is not None:
            model["hub_id_name"] = said
    return config_file(tmp_path, {"models": models})


def test_a_hub_id_two_models_share_must_be_claimed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        build_routes(load_config(hub_config(tmp_path)))
    assert str(raised.value) == (
        "models[0] (profile qwq-32b) and models[1] (profile qwq-32b-short) both serve Qwen/QwQ-32B, so "
        "'Qwen/QwQ-32B' would name either: set hub_id_name: true on the one that answers to it (and false "
        "on the other)")


@pytest.mark.parametrize(("first", "second", "owner"), [(True, None, "qwq-32b"), (None, False, "qwq-32b"),
                                                        (False, True, "qwq-32b-short")])
def test_the_claimed_hub_id_names_that_model(tmp_path: Path, first: bool | None, second: bool | None,
                                             owner: str) -> None:
    routes = build_routes(load_config(hub_config(tmp_path, first, second)))
    assert routes["Qwen/QwQ-32B"].served_name == owner
    assert {"qwq-32b", "qwq", "qwq-32b-short"} <= set(routes)


def test_one_model_answers_to_its_hub_id_unasked(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"models": [{"profile": "qwen3-4b-instruct-fp8", "backends": ["http://h:1"]}]})
    route = build_routes(load_config(path))["Qwen/Qwen3-4B-Instruct-2507-FP8"]
    assert route.served_name == route.profile.served_model_name and route.sampling == route.profile.sampling


def test_a_local_model_has_no_hub_id(tmp_path: Path) -> None:
    assert set(build_routes(load_config(config_file(tmp_path, {"models": [MODEL]})))) == {"tiny", "tiny-qwen3"}


def test_a_whole_answer_is_bounded_by_what_the_profile_allows(tmp_path: Path) -> None:
    """timeouts.response_seconds null: first_byte_seconds + the largest answer the model name may ask
    (its max_tokens_cap, else max_model_len) at 10 tokens/s; set, it is used as it is."""
    profile = yaml.safe_load(Path("configs/models/tiny-qwen3.yaml").read_text())
    profile.update(name="capped", served_model_name="capped", aliases=[{"name": "short", "sampling": {
        "max_tokens_cap": 100}}])
    (tmp_path / "capped.yaml").write_text(yaml.safe_dump(profile))
    config = load_config(config_file(tmp_path, {"models": [
        {"profile": "qwq-32b", "backends": ["http://h:1"]},
        {"profile": str(tmp_path / "capped.yaml"), "backends": ["http://h:2"], "timeouts": {"first_byte_seconds": 30}},
        {"profile": "tiny-qwen3", "backends": ["http://h:3"], "timeouts": {"response_seconds": 7}},
    ]}))
    routes = build_routes(config)
    assert routes["qwq-32b"].response_seconds == 600 + 131072 / 10  # 3.8 h: no cap, the whole context
    assert routes["capped"].response_seconds == 30 + 2048 / 10
    assert routes["short"].response_seconds == 30 + 100 / 10
    assert routes["tiny"].response_seconds == 7
