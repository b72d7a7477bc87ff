"""Policies by name: each policy file registers itself; the config and the gateway look
them up here (as SGLang's router does with its policy factory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import Policy

P = TypeVar("P", bound=type[Policy])


@dataclass(frozen=True)
class PolicySpec:
    name: str
    make: Callable[[Any], Policy]
    options: type | None
    """The dataclass of its knobs (``policies: {<name>: {...}}`` in the config), if any."""


_SPECS: dict[str, PolicySpec] = {}


def register(name: str, options: type | None = None) -> Callable[[P], P]:
    """Class decorator: make ``name`` choosable with ``policy: <name>``."""

    def add(cls: P) -> P:
        if name in _SPECS:
            raise ValueError(f"policy {name!r} is registered twice")
        cls.name = name
        _SPECS[name] = PolicySpec(name, cls, options)
        return cls

    return add


def names() -> tuple[str, ...]:
    return tuple(_SPECS)


def spec(name: str) -> PolicySpec:
    return _SPECS[name]


def create(name: str, options: Any = None) -> Policy:
    """A new policy (its own state: one per cluster); default knobs when none are given."""
    s = _SPECS[name]
    if options is None and s.options is not None:
        options = s.options()
    return s.make(options)
