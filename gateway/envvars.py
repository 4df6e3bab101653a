"""Reading ``VMKG_*`` environment variables for traitlets ``@default`` methods.

An unset or empty variable means "use the fallback"; booleans accept 1/true/yes/on.
"""

from __future__ import annotations

import os


def env_str(name: str, fallback: str = "") -> str:
    return os.environ.get(name, fallback)


def env_int(name: str, fallback: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else fallback


def env_float(name: str, fallback: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else fallback


def env_bool(name: str, fallback: bool) -> bool:
    value = os.environ.get(name)
    if value in (None, ""):
        return fallback
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]
