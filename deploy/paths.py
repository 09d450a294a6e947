"""Where the repository keeps things; one place so tests and tools agree."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
MODELS_DIR = CONFIGS_DIR / "models"
CACHE_DIR = REPO_ROOT / ".cache"
GENERATED_MODELS_DIR = CACHE_DIR / "models"
