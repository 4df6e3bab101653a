"""Settings that an environment variable can set: :func:`env_trait`.

It lives here, in the lower layer, so that both the gateway's settings (``gateway.app``,
through ``gateway.envvars``) and the runtime's own configurables (``GuestLimits``) use
one helper: ``kernelmanager`` may not import ``gateway``, and ``gateway`` imports it from
the ``kernelmanager`` package root.

Every setting of ``vmkg serve`` is a traitlets trait with ``config=True``; most can also
come from a ``VMKG_*`` environment variable. Precedence, highest first:

    command line  >  config file  >  $VMKG_*  >  the trait's default

``env_trait(Integer, "VMKG_PORT", 8888, help="Port to listen on.")`` makes that trait in
one line: a configurable ``Integer`` whose *dynamic default* reads ``$VMKG_PORT`` when an
instance first needs the value, and whose help names the variable (``... ($VMKG_PORT)``,
so ``vmkg serve --help-all`` lists it). The command line and config files set the trait
itself, so the default (and with it the variable) is never consulted then: that gives
the precedence above with no code of ours. Traits inherited from jupyter_server are
re-declared with the same type, default and help plus the variable (see
:func:`inherited_help`).

How a variable's text becomes a value depends on the trait's type:

    Unicode   the text as it is (set but empty: "")
    Integer   int(text); unset or empty: the default
    Float     float(text); unset or empty: the default
    Bool      1/true/yes/on (any case) is True, anything else False; unset or empty: the default
    List      comma-separated, blanks dropped; unset or empty: the default

``zero_is_default=True`` also treats ``0`` as unset, for settings where 0 cannot work
(a websocket message limit, a fork count). A value that does not parse (``VMKG_PORT=x``)
fails at start with the variable's name in the message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from traitlets import Bool, Float, HasTraits, Integer, List, TraitError, TraitType, Unicode

T = TypeVar("T", bound=TraitType)


def _parser(kind: type) -> Callable[[str], Any]:
    if issubclass(kind, Bool):
        return lambda text: text.strip().lower() in ("1", "true", "yes", "on")
    if issubclass(kind, Integer):
        return int
    if issubclass(kind, Float):
        return float
    if issubclass(kind, List):
        return lambda text: [v.strip() for v in text.split(",") if v.strip()]
    if issubclass(kind, Unicode):
        return str
    raise TypeError(f"env_trait: no parser for {kind.__name__} traits")


_ENV_KINDS: dict[type, type] = {}


def _env_kind(kind: type[T]) -> type[T]:
    """``kind`` with a default read from the environment. Same ``__name__`` as ``kind``, so
    ``--help-all`` shows ``--X.port=<Int>`` as before. One subclass per kind."""
    if kind in _ENV_KINDS:
        return _ENV_KINDS[kind]
    parse = _parser(kind)

    def default(self: Any, obj: Any = None) -> Any:
        fallback = kind.default(self, obj)
        var = self.metadata["env_var"]
        text = os.environ.get(var)
        if text is None or (text == "" and not issubclass(kind, Unicode)):
            return fallback
        try:
            value = parse(text)
        except ValueError as exc:
            raise TraitError(f"${var}={text!r}: not a valid {kind.__name__}") from exc
        if self.metadata["zero_is_default"] and value == 0:
            return fallback
        return value

    sub = type(kind.__name__, (kind,), {"default": default, "__module__": __name__,
                                        "__qualname__": kind.__qualname__, "__doc__": kind.__doc__})
    _ENV_KINDS[kind] = sub
    return sub


def env_trait(kind: type[T], env_var: str, default_value: Any, *, help: str,
              zero_is_default: bool = False, **kwargs: Any) -> T:
    """A configurable ``kind`` trait whose default comes from ``$env_var`` when it is set.

    ``kwargs`` go to the trait (``allow_none``, ``trait`` for a List's items...). The help
    gets `` ($ENV_VAR)`` appended (``($ENV_VAR, comma-separated)`` for a List).
    """
    note = f"(${env_var}, comma-separated)" if issubclass(kind, List) else f"(${env_var})"
    trait = _env_kind(kind)(default_value=default_value, config=True, help=f"{help} {note}", **kwargs)
    return trait.tag(env_var=env_var, zero_is_default=zero_is_default)


def inherited_help(cls: type[HasTraits], name: str) -> str:
    """The help of trait ``name`` of ``cls`` (to re-declare it with an environment variable)."""
    return str(cls.class_traits()[name].help).strip()
