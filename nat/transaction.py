"""A change of the ruleset as data: a :class:`Transaction` of add, delete and flush
operations on typed objects (:mod:`nat.ruleset`), rendered once to one ``nft -f -``
script.  Pure: no I/O; :class:`nat.nft.Nft` runs it, :class:`nat.fake.FakeNft` applies
it to an in-memory ruleset.

Theory of operation
-------------------
Operations name their table by family and name, as nft's commands do, and keep nft's
meaning: ``add`` creates what is missing and leaves what exists (an element whose key
exists with another value is refused); ``delete`` refuses what does not exist; ``flush``
empties a chain of its rules, a set or map of its elements, a table's chains of their
rules.  Two compositions give the idempotent forms: :meth:`Transaction.replace_table`
(add the empty table, delete it, add the new definition: packets see the old table or
the new one) and :meth:`Transaction.destroy_table` (add, then delete).

A table added with its contents renders in nft's block form (``table F N { … }``);
every other operation as one command line.  Element operations on the same set that
follow each other are merged into one command.  nft applies the whole script or none of
it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from nat.ruleset import Chain, Element, Map, Set, Table, _ident

__all__ = ["Kind", "Op", "Transaction", "Verb"]


class Verb(enum.Enum):
    ADD = "add"
    DELETE = "delete"
    FLUSH = "flush"


class Kind(enum.Enum):
    TABLE = "table"
    CHAIN = "chain"
    SET = "set"
    MAP = "map"
    ELEMENT = "element"


Body = Table | Chain | Set | Map


@dataclass(frozen=True)
class Op:
    """One operation.  ``name``: the chain, set or map (an element's: its set); ``body``:
    what an ``add`` adds (None for delete and flush); ``elements``: of an element op."""

    verb: Verb
    kind: Kind
    family: str
    table: str
    name: str | None = None
    body: Body | None = None
    elements: tuple[Element, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.family} {self.table}" + (f" {self.name}" if self.name else "")

    def render(self) -> str:
        if self.kind is Kind.ELEMENT:
            texts = (e.render() if self.verb is Verb.ADD else e.key_text
                     for e in self.elements)
            return f"{self.verb.value} element {self.where} {{ {', '.join(texts)} }}\n"
        if self.verb is not Verb.ADD:
            return f"{self.verb.value} {self.kind.value} {self.where}\n"
        body = self.body
        if isinstance(body, Table):
            return f"add table {self.where}\n" if body.empty else body.render()
        if isinstance(body, Chain):
            head = f" {{ {body.header} }}" if body.header else ""
            return f"add chain {self.where}{head}\n" + "".join(
                f"add rule {self.where} {rule}\n" for rule in body.rules)
        if isinstance(body, Set | Map):
            return f"add {self.kind.value} {self.where} {{ type {body.type_text}; }}\n"
        raise AssertionError(f"no body for {self}")  # pragma: no cover


class Transaction:
    """Operations, in order; ``render()`` is the one script that applies them all."""

    def __init__(self) -> None:
        self._ops: list[Op] = []

    @property
    def ops(self) -> tuple[Op, ...]:
        return tuple(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    def __bool__(self) -> bool:
        return bool(self._ops)

    def render(self) -> str:
        return "".join(op.render() for op in self._ops)

    def _add(self, op: Op) -> Transaction:
        Table(op.family, op.table)  # validates family and name
        if op.name is not None:
            _ident(op.name)
        self._ops.append(op)
        return self

    # tables

    def add_table(self, table: Table) -> Transaction:
        """The table and everything in it (merged into the table if it exists)."""
        return self._add(Op(Verb.ADD, Kind.TABLE, table.family, table.name, body=table))

    def delete_table(self, family: str, name: str) -> Transaction:
        return self._add(Op(Verb.DELETE, Kind.TABLE, family, name))

    def flush_table(self, family: str, name: str) -> Transaction:
        return self._add(Op(Verb.FLUSH, Kind.TABLE, family, name))

    def destroy_table(self, family: str, name: str) -> Transaction:
        """Delete the table if it exists (idempotent)."""
        return self.add_table(Table(family, name)).delete_table(family, name)

    def replace_table(self, table: Table) -> Transaction:
        """Replace the table, or make it: atomic and idempotent."""
        return self.destroy_table(table.family, table.name).add_table(table)

    # chains

    def add_chain(self, family: str, table: str, chain: Chain) -> Transaction:
        """The chain (if missing) and its rules (appended)."""
        return self._add(Op(Verb.ADD, Kind.CHAIN, family, table, chain.name, chain))

    def flush_chain(self, family: str, table: str, name: str) -> Transaction:
        return self._add(Op(Verb.FLUSH, Kind.CHAIN, family, table, name))

    def delete_chain(self, family: str, table: str, name: str) -> Transaction:
        return self._add(Op(Verb.DELETE, Kind.CHAIN, family, table, name))

    # sets and maps

    def add_set(self, family: str, table: str, container: Set | Map) -> Transaction:
        """The set or map (if missing), then its elements."""
        kind = Kind.MAP if isinstance(container, Map) else Kind.SET
        self._add(Op(Verb.ADD, kind, family, table, container.name, container.definition()))
        return self.add_elements(family, table, container.name, container.elements)

    def flush_set(self, family: str, table: str, container: Set | Map) -> Transaction:
        kind = Kind.MAP if isinstance(container, Map) else Kind.SET
        return self._add(Op(Verb.FLUSH, kind, family, table, container.name))

    def delete_set(self, family: str, table: str, container: Set | Map) -> Transaction:
        kind = Kind.MAP if isinstance(container, Map) else Kind.SET
        return self._add(Op(Verb.DELETE, kind, family, table, container.name))

    # elements

    def add_elements(self, family: str, table: str, name: str,
                     elements: Iterable[Element]) -> Transaction:
        """Elements of the set or map ``name`` (nothing if there are none)."""
        return self._elements(Verb.ADD, family, table, name, elements)

    def delete_elements(self, family: str, table: str, name: str,
                        elements: Iterable[Element]) -> Transaction:
        """Elements by key (a value given is ignored)."""
        return self._elements(Verb.DELETE, family, table, name, elements)

    def _elements(self, verb: Verb, family: str, table: str, name: str,
                  elements: Iterable[Element]) -> Transaction:
        items = tuple(elements)
        for e in items:
            if not isinstance(e, Element):
                raise ValueError(f"not an element: {e!r}")
        if not items:
            return self
        op = Op(verb, Kind.ELEMENT, family, table, name, elements=items)
        last = self._ops[-1] if self._ops else None
        if last is not None and last.kind is Kind.ELEMENT and (
                last.verb, last.family, last.table, last.name) == (verb, family, table, name):
            self._ops[-1] = replace(last, elements=last.elements + items)
            return self
        return self._add(op)
