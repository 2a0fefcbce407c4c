"""An in-memory nft for unit tests: :class:`FakeNft` applies transactions to a ruleset
of its own and can ``dump()`` it, so tests assert on the resulting tables rather than on
script text (knftables' ``Fake``).

It keeps nft's meaning of each operation (see :mod:`nat.transaction`) and refuses as nft
does, with the errno nft reports: a missing table, chain, set or element to change or
delete (ENOENT), a map element whose key is taken with another value or a set declared
again with another type (EEXIST), a set that a rule uses or a chain that has rules
(EBUSY), a base chain hooked again elsewhere (EOPNOTSUPP).  A transaction applies whole
or not at all.  Rules are kept as the text given (nft would normalise it); a rule that
looks up ``@name`` needs that set or map in its table.  Element order is not kept (nor
does nft keep it): a table lists its elements in the canonical order
(:meth:`nat.ruleset.Table.canonical`: compare ``fake.table(…)`` with ``t.canonical()``).
"""

from __future__ import annotations

import copy
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from nat.errors import ErrorFactory, NatError
from nat.ruleset import Chain, Element, Map, Set, Table
from nat.transaction import Kind, Op, Transaction, Verb

__all__ = ["FakeNft"]

_LOOKUP = re.compile(r"@([A-Za-z][A-Za-z0-9_-]*)")


class _Refused(Exception):
    def __init__(self, code: int, op: Op) -> None:
        super().__init__(code)
        self.code = code
        self.op = op


@dataclass
class _Chain:
    chain: Chain                      # the definition, without rules
    rules: list[str] = field(default_factory=list)


@dataclass
class _Set:
    container: Set | Map              # the definition, without elements
    elements: dict[tuple[str, ...], Element] = field(default_factory=dict)


@dataclass
class _Table:
    family: str
    name: str
    comment: str | None
    chains: dict[str, _Chain] = field(default_factory=dict)
    sets: dict[str, _Set] = field(default_factory=dict)    # sets and maps share names

    def snapshot(self) -> Table:
        def filled(s: _Set) -> Set | Map:
            c = s.container
            items = tuple(s.elements.values())
            return Map(c.name, c.key, c.value, items) if isinstance(c, Map) else Set(
                c.name, c.key, items, counter=c.counter)
        sets = [filled(s) for s in self.sets.values()]
        return Table(self.family, self.name,
                     tuple(Chain(c.chain.name, tuple(c.rules), c.chain.type, c.chain.hook,
                                 c.chain.priority, c.chain.policy)
                           for c in self.chains.values()),
                     maps=tuple(s for s in sets if isinstance(s, Map)),
                     sets=tuple(s for s in sets if isinstance(s, Set)),
                     comment=self.comment).canonical()


Ruleset = dict[tuple[str, str], _Table]


class FakeNft:
    """Applies transactions to an in-memory ruleset; ``transactions``: those applied.
    ``error``: the exception raised for a refusal (as :class:`nat.nft.Nft`'s)."""

    def __init__(self, *, error: ErrorFactory = NatError) -> None:
        self._error = error
        self._tables: Ruleset = {}
        self.transactions: list[Transaction] = []

    def run(self, tx: Transaction) -> None:
        if not tx:
            return
        staged = copy.deepcopy(self._tables)
        try:
            for op in tx.ops:
                _APPLY[op.verb, op.kind](staged, op)
        except _Refused as exc:
            text = exc.op.render().splitlines()[0]
            raise self._error(f"nft -f - failed: Error: Could not process rule: "
                              f"{os.strerror(exc.code)}: {text}", exc.code) from None
        self._tables = staged
        self.transactions.append(tx)

    def list_tables(self) -> list[str]:
        return [f"{family} {name}" for family, name in self._tables]

    def list_table(self, family: str, name: str) -> str | None:
        table = self.table(family, name)
        return table.render() if table is not None else None

    def table(self, family: str, name: str) -> Table | None:
        """The table as it is now (canonical: elements sorted), None if there is none."""
        found = self._tables.get((family, name))
        return found.snapshot() if found is not None else None

    def dump(self) -> str:
        """The whole ruleset as nft text, tables in the order they were made."""
        return "".join(t.snapshot().render() for t in self._tables.values())


# -- applying one operation ------------------------------------------------------------


def _table(tables: Ruleset, op: Op) -> _Table:
    found = tables.get((op.family, op.table))
    if found is None:
        raise _Refused(errno.ENOENT, op)
    return found


def _named(table: _Table, op: Op) -> _Set:
    found = table.sets.get(op.name or "")
    wanted = Map if op.kind is Kind.MAP else Set
    if found is None or (op.kind is not Kind.ELEMENT
                         and not isinstance(found.container, wanted)):
        raise _Refused(errno.ENOENT, op)
    return found


def _add_table(tables: Ruleset, op: Op) -> None:
    assert isinstance(op.body, Table)
    body = op.body
    table = tables.setdefault((op.family, op.table), _Table(op.family, op.table, body.comment))
    containers: tuple[Set | Map, ...] = (*body.sets, *body.maps)
    for container in containers:
        _merge_set(table, container, op)
    for chain in body.chains:
        _merge_chain(table, chain, op)


def _merge_set(table: _Table, container: Set | Map, op: Op) -> None:
    definition = container.definition()
    found = table.sets.setdefault(container.name, _Set(definition))
    if found.container != definition:
        raise _Refused(errno.EEXIST, op)
    for element in container.elements:
        old = found.elements.setdefault(element.key, element)
        if old != element:
            raise _Refused(errno.EEXIST, op)


def _merge_chain(table: _Table, chain: Chain, op: Op) -> None:
    for rule in chain.rules:
        for name in _LOOKUP.findall(rule):
            if name not in table.sets:
                raise _Refused(errno.ENOENT, op)
    found = table.chains.setdefault(chain.name, _Chain(chain.definition()))
    old = found.chain
    if (old.type, old.hook, old.priority) != (chain.type, chain.hook, chain.priority):
        raise _Refused(errno.EOPNOTSUPP, op)
    found.chain = chain.definition()   # the policy may change
    found.rules.extend(chain.rules)


def _delete_table(tables: Ruleset, op: Op) -> None:
    _table(tables, op)
    del tables[op.family, op.table]


def _flush_table(tables: Ruleset, op: Op) -> None:
    for chain in _table(tables, op).chains.values():
        chain.rules.clear()


def _add_chain(tables: Ruleset, op: Op) -> None:
    assert isinstance(op.body, Chain)
    _merge_chain(_table(tables, op), op.body, op)


def _chain(tables: Ruleset, op: Op) -> _Chain:
    found = _table(tables, op).chains.get(op.name or "")
    if found is None:
        raise _Refused(errno.ENOENT, op)
    return found


def _delete_chain(tables: Ruleset, op: Op) -> None:
    if _chain(tables, op).rules:
        raise _Refused(errno.EBUSY, op)
    del _table(tables, op).chains[op.name or ""]


def _flush_chain(tables: Ruleset, op: Op) -> None:
    _chain(tables, op).rules.clear()


def _add_set(tables: Ruleset, op: Op) -> None:
    assert isinstance(op.body, Set | Map)
    _merge_set(_table(tables, op), op.body, op)


def _delete_set(tables: Ruleset, op: Op) -> None:
    table = _table(tables, op)
    _named(table, op)
    if any(op.name in _LOOKUP.findall(rule)
           for chain in table.chains.values() for rule in chain.rules):
        raise _Refused(errno.EBUSY, op)
    del table.sets[op.name or ""]


def _flush_set(tables: Ruleset, op: Op) -> None:
    _named(_table(tables, op), op).elements.clear()


def _add_elements(tables: Ruleset, op: Op) -> None:
    found = _named(_table(tables, op), op)
    value = found.container.value if isinstance(found.container, Map) else ()
    for element in op.elements:
        if len(element.key) != len(found.container.key) or len(element.value) != len(value):
            raise _Refused(errno.EINVAL, op)
        if found.elements.setdefault(element.key, element) != element:
            raise _Refused(errno.EEXIST, op)


def _delete_elements(tables: Ruleset, op: Op) -> None:
    found = _named(_table(tables, op), op)
    for element in op.elements:
        if found.elements.pop(element.key, None) is None:
            raise _Refused(errno.ENOENT, op)


_APPLY: dict[tuple[Verb, Kind], Callable[[Ruleset, Op], None]] = {
    (Verb.ADD, Kind.TABLE): _add_table,
    (Verb.DELETE, Kind.TABLE): _delete_table,
    (Verb.FLUSH, Kind.TABLE): _flush_table,
    (Verb.ADD, Kind.CHAIN): _add_chain,
    (Verb.DELETE, Kind.CHAIN): _delete_chain,
    (Verb.FLUSH, Kind.CHAIN): _flush_chain,
    (Verb.ADD, Kind.SET): _add_set,
    (Verb.DELETE, Kind.SET): _delete_set,
    (Verb.FLUSH, Kind.SET): _flush_set,
    (Verb.ADD, Kind.MAP): _add_set,
    (Verb.DELETE, Kind.MAP): _delete_set,
    (Verb.FLUSH, Kind.MAP): _flush_set,
    (Verb.ADD, Kind.ELEMENT): _add_elements,
    (Verb.DELETE, Kind.ELEMENT): _delete_elements,
}
