"""One small name -> entry registry, used for every pluggable piece of cppo.

Every registry (divergences, aggregations, policy losses, gates, selectors, rewards, perturbations,
presets) is written the same way, after verl's ``core_algos`` (``@register_policy_loss("vanilla")``)::

    DIVERGENCES = Registry("divergence")
    register_divergence = DIVERGENCES.register
    get_divergence = DIVERGENCES.get

    @register_divergence("k3")
    def k3(a, b): ...

An entry is usually a function; it can be any object (a ``Perturbation`` instance, a ``Preset``),
registered by call instead of as a decorator: ``PRESETS.register(preset.name)(preset)``.

``get`` of an unknown name raises ``ValueError`` listing the valid names (or the error the registry
was made with, e.g. ``cppo.perturb``'s ``UnknownNameError``). This module imports nothing from cppo,
so any subpackage can use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _unknown_name(kind: str, name: str, valid: list[str]) -> Exception:
    return ValueError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


class Registry:
    """A named table of entries that share one calling convention (stated where it is made).

    Args:
        kind: what an entry is, for messages (``"divergence"``, ``"perturbation"``).
        error: ``(kind, name, valid names) -> Exception`` raised by ``get`` for an unknown name;
            defaults to a ``ValueError`` ``"unknown <kind> '<name>'; valid: a, b"``.
    """

    def __init__(self, kind: str, error: Callable[[str, str, list[str]], Exception] | None = None):
        self.kind = kind
        self._error = error or _unknown_name
        self._entries: dict[str, Any] = {}

    def register(self, name: str, overwrite: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@registry.register("name")``; returns the entry unchanged.

        A name can be registered only once unless ``overwrite`` is true.
        """

        def decorator(entry: Any) -> Any:
            if name in self._entries and not overwrite:
                old = self._entries[name]
                taken = getattr(old, "__name__", type(old).__name__)
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {taken}); "
                    "pass overwrite=True to replace it"
                )
            self._entries[name] = entry
            return entry

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugins); a name that is not registered is ignored."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise self._error(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        """(name, entry) pairs sorted by name."""
        return sorted(self._entries.items(), key=lambda kv: kv[0])

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
