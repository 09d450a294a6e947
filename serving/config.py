"""The proxy's configuration: configs/proxy.yaml (or --backend flags) parsed once, typed."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator

from deploy.loader import load_profile
from deploy.profile import Adapter, Profile, Sampling
from deploy.typed_config import Strict, describe_errors

MAX_WORKERS = 64
KEYS_HINT = "configs/proxy.yaml documents every key"
# vLLM 0.32's OpenAI-compatible endpoints that take a JSON body naming a `model`, besides the two
# the proxy shapes (chat and completions). Admin endpoints (LoRA loading, sleep, profiling, cache
# resets) are left out on purpose: the public endpoint must not reach them.
DEFAULT_FORWARD_PATHS = ("/v1/embeddings", "/v1/responses", "/v1/score", "/v1/rerank")
# The decode rate a whole (non-streamed) answer is allowed when timeouts.response_seconds is null.
# Per sequence, a 32B model at full batch on one GPU decodes ~20-30 tokens/s (vLLM's usual figures
# for a busy replica); 10 leaves room for slower GPUs, heavier batches and long contexts, so the
# bound only ends an answer whose backend has hung.
SLOW_DECODE_TOKENS_PER_SECOND = 10.0


class Listen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)


class Timeouts(Strict):
    connect_seconds: float = Field(default=5.0, gt=0, description="TCP connect to a backend.")
    first_byte_seconds: float = Field(
        default=600.0, gt=0, description="Until the response starts (its head and first byte): long for "
        "reasoning models' prefill.")
    idle_seconds: float = Field(default=120.0, gt=0, description="Longest silence between two streamed chunks.")
    response_seconds: float | None = Field(
        default=None, gt=0, description="From the request sent to the last byte of a whole (non-streamed) "
        "answer, whose head vLLM sends only once it has generated every token. null: derived per model name "
        "from its profile: first_byte_seconds + the largest max_tokens it allows (its max_tokens_cap, else "
        f"max_model_len) at {SLOW_DECODE_TOKENS_PER_SECOND:g} tokens/s.")


class Affinity(Strict):
    epsilon: float = Field(
        default=0.25, gt=0, le=10, description="Bounded load: a backend holding more than (1 + epsilon) x the mean "
        "of the live keys placed, or carrying more than (1 + epsilon) x the mean requests in flight, takes no "
        "new key; one carrying more than that (and more than headroom above the mean) no request of a key it "
        "holds; each goes to the next one on the ring.")
    headroom: int = Field(
        default=8, ge=0, le=10_000, description="Requests in flight a backend may carry above the mean before a "
        "request of a key it holds goes elsewhere, however small (1 + epsilon) x the mean is: an engine batches "
        "a few more requests at little cost, while another replica re-prefills the conversation's whole history.")
    session_header: str = Field(
        default="x-session-id", pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
        description="Request header whose value keys a session to one backend; the OpenAI `user` field "
        "does the same when the header is absent.")

    @field_validator("session_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()  # header names arrive lower-cased


class OutlierEjection(Strict):
    consecutive_failures: int = Field(
        default=5, ge=0, le=1000, description="Failures in a row (a 5xx the backend produced, a reset or cut "
        "after the request went out, a timeout; never a client's 4xx) that take a backend out of rotation; "
        "0 turns ejection off. Envoy's outlier detection defaults to 5 consecutive 5xx.")
    base_ejection_seconds: float = Field(
        default=30.0, gt=0, description="Cool-down of a first ejection; each further one lasts this times the "
        "number of ejections (Envoy's base_ejection_time). Then one request is let through (half-open): "
        "success puts the backend back, failure ejects it again.")
    max_ejection_seconds: float = Field(default=300.0, gt=0, description="Longest cool-down.")
    max_ejected_percent: int = Field(
        default=50, ge=0, le=100, description="Most of a model's backends out at once (at least one may always "
        "be, when there are two or more); the last usable backend is never ejected.")


def _backend_url(url: str) -> str:
    """A backend base URL the proxy can reach: refused at load rather than failing at startup."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("a backend must be an http:// or https:// URL")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if parts.query or parts.fragment:
        raise ValueError("a backend base URL takes no query or fragment")
    return url.rstrip("/")


BackendUrl = Annotated[str, AfterValidator(_backend_url)]


class ModelEntry(Strict):
    profile: str = Field(description="Profile name in configs/models; names, aliases and sampling come from it.")
    backends: list[BackendUrl] = Field(
        min_length=1, description="vLLM base URLs, e.g. http://127.0.0.1:8100 (user:password@ for basic auth, "
        "never shown in metrics or logs). With discover, a host name that resolves to several addresses (a "
        "Kubernetes headless Service) is one backend per address.")
    discover: bool = Field(
        default=False, description="Resolve each backend host name every dns_refresh_seconds and use every "
        "address as a backend (a Kubernetes headless Service); requests keep the URL's host name in Host and "
        "TLS. false: each URL is one backend, as written.")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    outlier_ejection: OutlierEjection = Field(default_factory=OutlierEjection)
    routing: Literal["prefix_affinity", "least_in_flight"] = Field(
        default="prefix_affinity", description="prefix_affinity: requests sharing a prompt prefix or session go "
        "to the same backend (its prefix cache), within bounded load; least_in_flight: the backend with the "
        "fewest requests in flight, ties round-robin. With one backend both are the same.")
    affinity: Affinity = Field(default_factory=Affinity)
    hub_id_name: bool | None = Field(
        default=None, description="Whether this model also answers to its profile's hub id (e.g. "
        "Qwen/QwQ-32B), as vLLM names a model served without a name. Unset: yes, unless another "
        "configured model has the same hub id (then one of them must say true).")


class Auth(Strict):
    api_keys_env: str | None = Field(default=None, description="Environment variable with comma-separated keys.")
    api_keys_file: str | None = Field(default=None, description="File with one key per line.")


class Limits(Strict):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    requests_per_minute_per_key: int | None = Field(
        default=None, ge=1, description="Per identity and per proxy process: the API key when keys are "
        "configured, else the client's address.")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Addresses or CIDRs whose X-Forwarded-For is believed: a request "
        "from one of them is identified by the right-most X-Forwarded-For address that is not trusted.")
    # Longer than load balancers' usual 60 s keep-alive, so they close first.
    client_idle_seconds: float = Field(
        default=75.0, gt=0, description="A client connection with no whole request for this long is closed "
        "(idle keep-alive, or part of a request and then nothing).")


    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"trusted proxy {item!r} must be an IP address or CIDR (e.g. 10.0.0.0/8)") from None
        return value


class Retries(Strict):
    max_attempts: int = Field(
        default=3, ge=1, le=10, description="Backend attempts per request, the first included. Only attempts "
        "that provably never started are retried: a refused or timed-out connect (on another backend), or a "
        "reused keep-alive connection that closed before any response byte (once, on a fresh connection).")


class ProxyConfig(Strict):
    listen: Listen = Field(default_factory=Listen)
    models: list[ModelEntry] = Field(min_length=1)
    auth: Auth = Field(default_factory=Auth)
    limits: Limits = Field(default_factory=Limits)
    retries: Retries = Field(default_factory=Retries)
    forward_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FORWARD_PATHS),
        description="Paths besides /v1/chat/completions and /v1/completions forwarded untouched to the backend "
        "of the body's `model`; anything else under /v1/ is a 404 that never reaches a backend.")
    drain_seconds: float = Field(
        default=1200.0, ge=0, description="On SIGTERM, the longest the proxy waits for requests in flight: "
        "a QwQ-32B answer at its default max_tokens (32,768) takes ~18 min at 30 tokens/s. The drain ends "
        "as soon as nothing is in flight, so only a pod with long streams takes this long.")
    health_interval_seconds: float = Field(default=2.0, gt=0)
    dns_refresh_seconds: float = Field(
        default=5.0, gt=0, description="Backend host names are re-resolved this often; addresses that appear "
        "become backends (health-checked before use), addresses that disappear are dropped.")
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS, description="Proxy processes sharing the port (SO_REUSEPORT).")


    @field_validator("forward_paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/v1/") or any(c in path for c in "?#%\\ ") or "/." in path:
                raise ValueError(f"forward path {path!r} must be a plain path under /v1/ (no query, "
                                 "percent-encoding, spaces or dot segments)")
        return value


class ConfigError(Exception):
    """A configuration the proxy cannot start with; the message names file and key."""


@dataclass(frozen=True)
class Route:
    """One client-visible model name: the profile behind it and the preset it uses."""

    name: str
    served_name: str  # the name vLLM knows: the profile's served name, or a LoRA adapter's own
    profile: Profile
    sampling: Sampling
    entry: ModelEntry
    adapter: Adapter | None = None  # a LoRA adapter on the profile's model, served by its backends
    # timeouts.response_seconds, or when null what this name's preset allows (response_seconds()).
    response_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.response_seconds:
            object.__setattr__(self, "response_seconds", response_seconds(self.entry, self.profile, self.sampling))


def response_seconds(entry: ModelEntry, profile: Profile, sampling: Sampling) -> float:
    """The bound on a whole non-streamed answer: the configured one, or first_byte_seconds plus the
    largest answer this preset allows (its max_tokens_cap, else the context) at a slow decode rate."""
    if entry.timeouts.response_seconds is not None:
        return entry.timeouts.response_seconds
    largest = min(sampling.max_tokens_cap or profile.max_model_len, profile.max_model_len)
    return entry.timeouts.first_byte_seconds + largest / SLOW_DECODE_TOKENS_PER_SECOND


def load_config(path: Path) -> ProxyConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with at least `models:` ({KEYS_HINT}), "
                          f"got {'an empty file' if data is None else type(data).__name__}")
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc, KEYS_HINT)}") from None


def config_from_backends(specs: list[str], host: str, port: int) -> ProxyConfig:
    """`--backend PROFILE=URL[,URL]` flags, for running without a file (make serve)."""
    models = []
    for spec in specs:
        profile, sep, urls = spec.partition("=")
        if not sep or not profile or not urls:
            raise ConfigError(f"--backend {spec!r}: expected PROFILE=URL[,URL...]")
        models.append({"profile": profile, "backends": urls.split(",")})
    try:
        return ProxyConfig.model_validate({"listen": {"host": host, "port": port}, "models": models})
    except ValidationError as exc:
        raise ConfigError(f"--backend: {describe_errors(exc, KEYS_HINT)}") from None


def build_routes(config: ProxyConfig) -> dict[str, Route]:
    """Every client-visible name -> its route; names must be unique across models."""
    routes: dict[str, Route] = {}
    profiles = []
    for index, entry in enumerate(config.models):
        try:
            profile = load_profile(entry.profile)
        except Exception as exc:  # noqa: BLE001 - a profile error is reported with its config key
            raise ConfigError(f"models[{index}].profile: {exc}") from None
        profiles.append(profile)
        for name in [profile.served_model_name, *profile.alias_names]:
            if name in routes:
                raise ConfigError(f"models[{index}]: model name {name!r} is already served by "
                                  f"profile {routes[name].profile.name!r}")
            routes[name] = Route(name, profile.served_model_name, profile, profile.sampling_for(name), entry)
        for adapter in profile.lora.adapters if profile.lora else []:
            if adapter.name in routes:
                raise ConfigError(f"models[{index}]: LoRA adapter {adapter.name!r} (profile {profile.name!r}, "
                                  f"lora.adapters) is already a model name of profile "
                                  f"{routes[adapter.name].profile.name!r}: rename the adapter")
            # vLLM serves an adapter under its own name: the request keeps it, the base's backends answer.
            routes[adapter.name] = Route(adapter.name, adapter.name, profile, profile.sampling_for(adapter.name),
                                         entry, adapter)
    for hub_id, index in _hub_id_owners(config, profiles).items():
        profile = profiles[index]
        if hub_id not in routes:  # a served name or alias spelled like the hub id is already there
            routes[hub_id] = Route(hub_id, profile.served_model_name, profile, profile.sampling, config.models[index])
    return routes


def _hub_id_owners(config: ProxyConfig, profiles: list[Profile]) -> dict[str, int]:
    """Hub id -> the index of the model entry that answers to it."""
    claims: dict[str, list[int]] = {}
    for index, profile in enumerate(profiles):
        if profile.model_path is None:  # a hub id, not a local directory
            claims.setdefault(profile.model, []).append(index)
    owners: dict[str, int] = {}
    for hub_id, indexes in claims.items():
        said = [i for i in indexes if config.models[i].hub_id_name is True]
        open_ = [i for i in indexes if config.models[i].hub_id_name is None]
        chosen = said if said else open_
        if len(chosen) > 1:
            names = " and ".join(f"models[{i}] (profile {profiles[i].name})" for i in chosen)
            raise ConfigError(f"{names} both serve {hub_id}, so {hub_id!r} would name either: set "
                              f"hub_id_name: true on the one that answers to it (and false on the other)")
        if chosen:
            owners[hub_id] = chosen[0]
    return owners


def load_api_keys(auth: Auth, environ: Mapping[str, str] = os.environ) -> list[bytes]:
    keys: list[str] = []
    if auth.api_keys_env:
        value = environ.get(auth.api_keys_env)
        if value is None:
            raise ConfigError(f"auth.api_keys_env: environment variable {auth.api_keys_env} is not set")
        keys += value.split(",")
    if auth.api_keys_file:
        try:
            keys += Path(auth.api_keys_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"auth.api_keys_file: cannot read {auth.api_keys_file}: {exc.strerror}") from None
    cleaned = [k.strip().encode() for k in keys if k.strip()]
    if (auth.api_keys_env or auth.api_keys_file) and not cleaned:
        raise ConfigError("auth: api keys are configured but none were found (empty variable or file)")
    return cleaned
