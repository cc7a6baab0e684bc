"""Backend registries: lazy loading, explainable choice, pinning without fallback.

Each package's functional API (attn_core.api, attn_sparse.api) owns one :class:`BackendRegistry`
over its ``<package>.backends.<name>`` modules. Backends never import each other; the registry is
the only place that knows them all. A choice is explainable: :class:`BackendChoice` names the
backend, why it was taken, and the reasons each other backend gave. attn_core's block primitives
choose their implementation the same way, over ``attn_core.block_impls.<name>``
(:func:`attn_core.blocks.explain_block`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

__all__ = ["BackendChoice", "BackendRegistry", "ReasonsOf"]


# Joins the choice's reason and the reasons of the backends skipped ahead of it in ``why``.
SKIPPED_SEPARATOR = "; skipped "


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a call and why; ``rejected`` maps other backends to their reasons.

    A backend listed with no reasons could have taken the call but comes later in the auto order.
    ``why`` is one line that also names the backends skipped ahead of the choice, with their
    reasons; ``str()`` is the multi-line report that gives every reason once (per backend).
    ``execution``: how the chosen backend runs this call, where it has more than one way (e.g. the
    dilated sdpa backend's executor and why); empty otherwise.
    """

    backend: str
    why: str
    rejected: dict[str, tuple[str, ...]]
    execution: str = ""

    def __str__(self) -> str:
        # the skipped backends' reasons follow on their own lines: keep them out of the header
        lines = [f"backend: {self.backend} ({self.why.split(SKIPPED_SEPARATOR, 1)[0]})"]
        if self.execution:
            lines.append(f"  runs as: {self.execution}")
        for name, reasons in self.rejected.items():
            lines.append(f"  not {name}: {'; '.join(reasons) if reasons else 'lower in the auto order'}")
        return "\n".join(lines)


ReasonsOf = Callable[[ModuleType], Sequence[str]]


class BackendRegistry:
    """The backends of one package, imported lazily from ``<package>.<subpackage>.<name>``.

    order: the preference order of ``backend="auto"`` (every known backend, best first).
    subpackage: ``"backends"`` for the attention backends; attn_core's block primitives use
    ``"block_impls"`` (:data:`attn_core.blocks.BLOCK_IMPLS`).
    """

    def __init__(self, package: str, order: Sequence[str], *, subpackage: str = "backends") -> None:
        self.package = package
        self.subpackage = subpackage
        self.order: tuple[str, ...] = tuple(order)
        self._modules: dict[str, ModuleType] = {}
        self._lock = threading.Lock()
        self._last = threading.local()

    def load(self, name: str) -> ModuleType | None:
        """The backend module, or None when it is not part of this installation."""
        # lock-free read (a dict lookup is atomic; entries are only ever added, under the lock),
        # which torch.compile can trace: it cannot trace a lock
        mod = self._modules.get(name)
        if mod is not None:
            return mod
        module_name = f"{self.package}.{self.subpackage}.{name}"
        try:
            mod = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise  # the backend exists but one of its own imports is broken: surface that
            return None
        with self._lock:
            self._modules[name] = mod
        return mod

    def load_all(self) -> None:
        """Import every backend module now (missing ones are skipped, as in :meth:`load`).

        The packages' api modules call this at import: torch.compile cannot trace an import, so a
        first call inside a compiled region must find the modules loaded (they import nothing heavy
        at module level).
        """
        for name in self.order:
            self.load(name)

    def reasons(self, name: str, reasons_of: ReasonsOf) -> tuple[str, ...]:
        """Why backend ``name`` cannot take the call ``reasons_of`` describes (empty: it can)."""
        mod = self.load(name)
        if mod is None:
            return (f"not installed (no module {self.package}.{self.subpackage}.{name})",)
        return tuple(reasons_of(mod))

    def choose(self, backend: object, reasons_of: ReasonsOf, *, explain_all: bool = False) -> BackendChoice:
        """Pick the backend for a call; a pinned backend that cannot take it raises ValueError.

        reasons_of(module) -> the module's reasons for refusing this call. Without ``explain_all``
        only the backends needed for the decision are asked (the pinned one, or the auto order up
        to the first that accepts), which keeps dispatch cheap; :func:`explain` asks them all.
        """
        allowed = ("auto", *self.order)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, one of {allowed}, got {backend!r}")
        if backend not in allowed:
            raise ValueError(f"unknown backend {backend!r}; allowed: {allowed}")
        asked: dict[str, tuple[str, ...]] = {}

        def ask(name: str) -> tuple[str, ...]:
            if name not in asked:
                asked[name] = self.reasons(name, reasons_of)
            return asked[name]

        if backend != "auto":
            if ask(backend):
                raise ValueError(f"backend {backend!r} cannot take this input: {'; '.join(asked[backend])}")
            chosen, why = backend, f"pinned by backend={backend!r}"
        else:
            chosen = next((name for name in self.order if not ask(name)), "")
            if not chosen:
                raise ValueError(
                    "no backend can take this input: " + " | ".join(f"{n}: {'; '.join(r)}" for n, r in asked.items())
                )
            i = self.order.index(chosen)
            why = f"first backend in the auto order {list(self.order)} that takes this input"
            skipped = [f"{n}: {'; '.join(asked[n])}" for n in self.order[:i]]
            if skipped:
                why += SKIPPED_SEPARATOR + " | ".join(skipped)
        if explain_all:
            for name in self.order:
                ask(name)
        return BackendChoice(chosen, why, {n: r for n, r in asked.items() if n != chosen})

    def record(self, name: str) -> None:
        """Remember the backend this thread ran last (see :meth:`last`)."""
        self._last.backend = name

    def last(self) -> str | None:
        """Name of the backend the most recent call in this thread ran."""
        return getattr(self._last, "backend", None)
