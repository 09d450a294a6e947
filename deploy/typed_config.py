"""The base of every typed configuration (profiles, the proxy's config) and the one formatter of
its validation errors: `<key.path>: <reason> (got <value>)`, one clause per error."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Unknown keys are errors (a typo must never be ignored silently); values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Tags pydantic puts into an error's location for the branch of a union it tried ('str',
# 'function-after[...]'), which are not keys the user wrote.
_BRANCH_TAGS = ("str", "int", "float", "bool", "none", "list", "dict")
_BRANCH_PREFIXES = ("function-", "literal[", "list[", "dict[", "is-instance[", "tagged-union[", "json-or-python[")


def _strict_model_names() -> set[str]:
    names: set[str] = set()
    pending: list[type[BaseModel]] = [Strict]
    while pending:
        cls = pending.pop()
        names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names


def format_location(loc: tuple[int | str, ...]) -> str:
    """('aliases', 0, 'Alias', 'name') -> 'aliases[0].name'; '' for the document itself."""
    models = _strict_model_names()
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in models or item in _BRANCH_TAGS or item.startswith(_BRANCH_PREFIXES):
            continue
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def describe_error(error: Any, unknown_key_hint: str = "") -> str:
    """One pydantic error (an item of ValidationError.errors()) as a line a user can act on."""
    loc = format_location(tuple(error["loc"]))
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling" + (f"; {unknown_key_hint})" if unknown_key_hint else ")")
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        got = error.get("input")
        if not (isinstance(got, dict | list) or got is None):
            message += f" (got {got!r})"
    return f"{loc}: {message}" if loc else message


def describe_errors(exc: ValidationError, unknown_key_hint: str = "") -> str:
    """Every error of exc, joined by '; '. `unknown_key_hint` says where the valid keys are
    documented, e.g. 'see configs/models/README.md for the keys'."""
    return "; ".join(describe_error(e, unknown_key_hint) for e in exc.errors())
