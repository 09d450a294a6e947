"""Errors the launcher reports to users as one clear line (exit status 2), never a traceback."""


class DeployError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do."""

    exit_code = 2


class ProfileError(DeployError):
    """A model profile is missing or invalid."""


class CheckError(DeployError):
    """vLLM's own code rejected the rendered arguments."""


class LaunchError(DeployError):
    """The stack cannot be started as asked (port in use, model missing, GPUs missing)."""
