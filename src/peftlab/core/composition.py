"""Composition blocks for ``set_adapter``: plain data naming how adapters combine.

``Stack("a", "b")`` applies the adapters in sequence where order means something and
together otherwise: bottleneck adapters run one after the other (``a``'s output feeds ``b``),
LoRA deltas add, IA3 scales multiply and prefixes concatenate (``a``'s first). It is the same
as activating the list ``["a", "b"]``.

``Parallel("a", "b")`` runs the batch through each branch in one forward pass: the inputs
are repeated along the batch, row block ``k`` goes through branch ``k`` (per-sample
adapters), and the outputs come back stacked along the batch, block ``k`` equal to running
branch ``k`` alone. A branch is an adapter name or a ``Stack`` of names.
"""

from __future__ import annotations

from collections.abc import Iterator


class Stack:
    """Adapters applied in sequence (see the module docstring)."""

    def __init__(self, *children: str) -> None:
        if not children:
            raise ValueError("Stack needs at least one adapter name, e.g. Stack('a', 'b')")
        for child in children:
            if not isinstance(child, str):
                raise ValueError(
                    f"Stack takes adapter names only, got {child!r}; nest the other way round: "
                    "Parallel(Stack('a', 'b'), 'c')"
                )
        if len(set(children)) != len(children):
            raise ValueError(f"Stack: adapter names repeat in {list(children)}")
        self.children: tuple[str, ...] = tuple(children)

    @property
    def names(self) -> tuple[str, ...]:
        return self.children

    def __iter__(self) -> Iterator[str]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.children == self.children  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(c) for c in self.children)})"


class Parallel:
    """Branches run side by side on copies of the batch (see the module docstring)."""

    def __init__(self, *children: str | Stack) -> None:
        if len(children) < 2:
            raise ValueError("Parallel needs at least two branches, e.g. Parallel('a', 'b')")
        for child in children:
            if not isinstance(child, (str, Stack)):
                raise ValueError(
                    f"a Parallel branch is an adapter name or a Stack of names, got {child!r}; "
                    "Parallel blocks do not nest"
                )
        self.children: tuple[str | Stack, ...] = tuple(children)

    @property
    def branches(self) -> tuple[tuple[str, ...], ...]:
        """Each branch as the tuple of adapter names it applies."""
        return tuple((c,) if isinstance(c, str) else c.names for c in self.children)

    @property
    def names(self) -> tuple[str, ...]:
        """Every adapter the block uses, each once, in order."""
        return tuple(dict.fromkeys(n for branch in self.branches for n in branch))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.children == self.children  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(c) for c in self.children)})"


Composition = Stack | Parallel
