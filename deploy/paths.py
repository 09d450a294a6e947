"""Where the repository keeps things, and the one rule for a local directory; one place so
tests and tools agree."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
MODELS_DIR = CONFIGS_DIR / "models"
CACHE_DIR = REPO_ROOT / ".cache"
GENERATED_MODELS_DIR = CACHE_DIR / "models"

# A profile's model or an adapter's source names a directory when it starts with one of these;
# otherwise it is a hub id (`org/name`). The chart's templates apply the same prefix test to the
# model and sources written into its generated files/profiles.yaml.
LOCAL_PREFIXES = (".", "/")


def is_local(source: str) -> bool:
    """A directory (`./models/x`, `/models/x`) rather than a hub id (`Qwen/QwQ-32B`)."""
    return source.startswith(LOCAL_PREFIXES)


def is_hub_id(source: str) -> bool:
    """Shaped like a hub id: not local, and `org/name` or a bare legacy name like `gpt2`."""
    return not is_local(source) and source.count("/") <= 1


def local_dir(source: str) -> Path:
    """The directory a local source names, relative to the repository (`~` expanded)."""
    return (REPO_ROOT / Path(source).expanduser()).resolve()


def shown(path: Path | str) -> str:
    """A path as messages show it: relative to the repository when inside it."""
    resolved = Path(path)
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)
