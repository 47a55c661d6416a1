"""One small name -> function registry, used for every pluggable piece of maths in cppo.

Every registry (divergences, aggregations, policy losses, gates, selectors) is written the same
way, after verl's ``core_algos`` (``@register_policy_loss("vanilla")``)::

    DIVERGENCES = Registry("divergence")
    register_divergence = DIVERGENCES.register
    get_divergence = DIVERGENCES.get

    @register_divergence("k3")
    def k3(a, b): ...

``get`` of an unknown name raises ``ValueError`` listing the valid names. This module imports
nothing from cppo, so any subpackage (``cppo.detect.select`` included) can use it without an
import cycle.
"""

from __future__ import annotations

from collections.abc import Callable


class Registry:
    """A named table of functions that share one calling convention (stated where it is made)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: ``@registry.register("name")``. A name can be registered only once."""

        def decorator(fn: Callable) -> Callable:
            if name in self._fns:
                taken = self._fns[name].__name__
                raise ValueError(f"{self.kind} {name!r} is already registered (by {taken})")
            self._fns[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._fns:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._fns[name]

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
