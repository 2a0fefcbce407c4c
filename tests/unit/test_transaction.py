"""nat.transaction and nat.fake: operations rendered once to one nft script, and the
in-memory ruleset that applies them with nft's meaning and refusals."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest

from nat.errors import NatError
from nat.fake import FakeNft
from nat.ruleset import Chain, Element, Map, NatSpec, PortMapSpec, Set, Table, nat_table
from nat.transaction import Kind, Transaction, Verb

KEY = ("inet_proto", "inet_service")
VALUE = ("ipv4_addr", "inet_service")
PRE = Chain("pre", ("meta l4proto . th dport @ports accept",), type="nat",
            hook="prerouting", priority="dstnat")


def element(port: int, target: str | None = None) -> Element:
    return Element(("tcp", str(port)), (target, str(port)) if target else ())


def base() -> Table:
    return Table("inet", "t", (PRE,), maps=(Map("m", KEY, VALUE),),
                 sets=(Set("ports", KEY, (element(22),)),), comment="hns:x")


def made(table: Table | None = None) -> FakeNft:
    fake = FakeNft()
    fake.run(Transaction().replace_table(table or base()))
    return fake


def refused(fake: FakeNft, tx: Transaction) -> int:
    before, count = fake.dump(), len(fake.transactions)
    with pytest.raises(NatError) as excinfo:
        fake.run(tx)
    assert fake.dump() == before and len(fake.transactions) == count   # all or nothing
    assert excinfo.value.errno is not None
    return excinfo.value.errno


# rendering


def test_every_operation_renders_as_nft_has_it() -> None:
    tx = (Transaction()
          .add_chain("inet", "t", Chain("c", ("counter", "accept")))
          .add_chain("inet", "t", PRE.definition())
          .add_set("inet", "t", Set("s", KEY, (element(1),)))
          .add_set("inet", "t", Map("m", KEY, VALUE))
          .flush_chain("inet", "t", "c").flush_set("inet", "t", Map("m", KEY, VALUE))
          .delete_set("inet", "t", Set("s", KEY)).delete_chain("inet", "t", "c")
          .flush_table("inet", "t").delete_table("inet", "t"))
    assert tx.render() == (
        "add chain inet t c\n"
        "add rule inet t c counter\n"
        "add rule inet t c accept\n"
        "add chain inet t pre { type nat hook prerouting priority dstnat; policy accept; }\n"
        "add set inet t s { type inet_proto . inet_service; }\n"
        "add element inet t s { tcp . 1 }\n"
        "add map inet t m { type inet_proto . inet_service : ipv4_addr . inet_service; }\n"
        "flush chain inet t c\n"
        "flush map inet t m\n"
        "delete set inet t s\n"
        "delete chain inet t c\n"
        "flush table inet t\n"
        "delete table inet t\n")


def test_replace_is_declare_delete_define() -> None:
    tx = Transaction().replace_table(base())
    assert [(op.verb, op.kind) for op in tx.ops] == [
        (Verb.ADD, Kind.TABLE), (Verb.DELETE, Kind.TABLE), (Verb.ADD, Kind.TABLE)]
    assert tx.render() == ("add table inet t\ndelete table inet t\n" + base().render())


def test_element_operations_on_one_set_merge() -> None:
    tx = (Transaction().add_elements("inet", "t", "m", [element(1, "10.0.0.1")])
          .add_elements("inet", "t", "m", [element(2, "10.0.0.1")])
          .delete_elements("inet", "t", "m", [element(3, "10.0.0.1")])
          .add_elements("inet", "t", "m", []))
    assert tx.render() == ("add element inet t m { tcp . 1 : 10.0.0.1 . 1, "
                           "tcp . 2 : 10.0.0.1 . 2 }\n"
                           "delete element inet t m { tcp . 3 }\n")
    assert len(tx) == 2


@pytest.mark.parametrize("atom", ["a b", "x}", "1,2", 'x"', "", "a;b", "a\n"])
def test_elements_refuse_unsafe_atoms(atom: str) -> None:
    with pytest.raises(ValueError, match="bad element atom"):
        Element(("tcp", atom))


def test_element_must_fit_its_set() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Set("s", KEY, (Element(("tcp",)),))
    with pytest.raises(ValueError, match="does not fit"):
        Map("m", KEY, VALUE, (element(1),))


@pytest.mark.parametrize("rule", ["accept; flush ruleset", "accept\nflush ruleset", "",
                                  "accept # x"])
def test_chain_refuses_more_than_one_rule(rule: str) -> None:
    with pytest.raises(ValueError, match="not one rule"):
        Chain("c", (rule,))


@pytest.mark.parametrize("name", ['t"', "t }", "", "t u"])
def test_operations_refuse_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError):
        Transaction().delete_table("inet", name)
    with pytest.raises(ValueError):
        Transaction().add_elements("inet", "t", name, [element(1)])


# the fake


def test_fake_dump_is_the_table_made() -> None:
    fake = made()
    assert fake.dump() == base().render()
    assert fake.table("inet", "t") == base()
    assert fake.list_tables() == ["inet t"]


def test_replace_drops_what_was_there() -> None:
    fake = made()
    fake.run(Transaction().add_elements("inet", "t", "m", [element(80, "10.0.0.2")]))
    fake.run(Transaction().replace_table(base()))
    assert fake.table("inet", "t") == base()


def test_destroy_is_idempotent_delete_is_not() -> None:
    fake = made()
    fake.run(Transaction().destroy_table("inet", "t"))
    fake.run(Transaction().destroy_table("inet", "t"))
    assert fake.dump() == ""
    assert refused(fake, Transaction().delete_table("inet", "t")) == errno.ENOENT


def test_add_merges_into_what_exists() -> None:
    fake = made()
    fake.run(Transaction().add_table(Table("inet", "t", comment="other")))
    fake.run(Transaction().add_chain("inet", "t", Chain("pre", ("counter",), type="nat",
                                                        hook="prerouting",
                                                        priority="dstnat", policy="drop")))
    now = fake.table("inet", "t")
    assert now is not None and now.comment == "hns:x"      # nft keeps the comment
    assert now.chains[0].rules == (*PRE.rules, "counter") and now.chains[0].policy == "drop"


def test_elements_add_delete_and_flush() -> None:
    fake = made()
    tx = Transaction().add_elements("inet", "t", "m", [element(443, "10.0.0.3"),
                                                       element(80, "10.0.0.2")])
    fake.run(tx.add_elements("inet", "t", "ports", [element(22), element(53)]))
    now = fake.table("inet", "t")
    assert now is not None
    assert now.maps[0].elements == (element(80, "10.0.0.2"), element(443, "10.0.0.3"))
    fake.run(Transaction().add_elements("inet", "t", "m", [element(80, "10.0.0.2")]))  # same
    fake.run(Transaction().delete_elements("inet", "t", "m", [element(80)])
             .flush_set("inet", "t", Set("ports", KEY)))
    now = fake.table("inet", "t")
    assert now is not None
    assert now.maps[0].elements == (element(443, "10.0.0.3"),) and now.sets[0].elements == ()


@pytest.mark.parametrize(("tx", "code"), [
    (Transaction().add_elements("inet", "t", "m", [element(1, "10.0.0.1")])
     .add_elements("inet", "t", "m", [element(1, "10.0.0.9")]), errno.EEXIST),
    (Transaction().delete_elements("inet", "t", "m", [element(1)]), errno.ENOENT),
    (Transaction().add_elements("inet", "t", "nope", [element(1)]), errno.ENOENT),
    (Transaction().add_elements("inet", "t", "m", [element(1)]), errno.EINVAL),
    (Transaction().add_elements("inet", "u", "m", [element(1, "10.0.0.1")]), errno.ENOENT),
    (Transaction().add_set("inet", "t", Set("m", KEY)), errno.EEXIST),
    (Transaction().add_set("inet", "t", Set("ports", ("ipv4_addr",))), errno.EEXIST),
    (Transaction().delete_set("inet", "t", Set("ports", KEY)), errno.EBUSY),
    (Transaction().delete_set("inet", "t", Set("m", KEY)), errno.ENOENT),
    (Transaction().delete_chain("inet", "t", "pre"), errno.EBUSY),
    (Transaction().delete_chain("inet", "t", "nope"), errno.ENOENT),
    (Transaction().flush_chain("inet", "t", "nope"), errno.ENOENT),
    (Transaction().add_chain("inet", "t", Chain("pre", type="nat", hook="output",
                                                priority="-100")), errno.EOPNOTSUPP),
    (Transaction().add_chain("inet", "t", Chain("c", ("ip daddr @nope accept",))),
     errno.ENOENT),
    (Transaction().add_chain("inet", "u", Chain("c")), errno.ENOENT),
    (Transaction().flush_table("inet", "u"), errno.ENOENT),
])
def test_fake_refuses_as_nft_does(tx: Transaction, code: int) -> None:
    assert refused(made(), tx) == code


def test_a_refusal_leaves_the_earlier_operations_unapplied() -> None:
    fake = made()
    tx = (Transaction().add_elements("inet", "t", "m", [element(80, "10.0.0.2")])
          .delete_elements("inet", "t", "ports", [element(9)]))
    assert refused(fake, tx) == errno.ENOENT


def test_fake_raises_the_callers_error() -> None:
    class Mine(Exception):
        def __init__(self, message: str, errno: int | None) -> None:
            super().__init__(message)
            self.errno = errno

    fake = FakeNft(error=Mine)
    with pytest.raises(Mine, match="No such file or directory: delete table inet t") as exc:
        fake.run(Transaction().delete_table("inet", "t"))
    assert exc.value.errno == errno.ENOENT


def test_flush_table_empties_the_chains() -> None:
    fake = made()
    fake.run(Transaction().flush_table("inet", "t"))
    now = fake.table("inet", "t")
    assert now is not None and now.chains == (PRE.definition(),)
    fake.run(Transaction().delete_chain("inet", "t", "pre")
             .delete_set("inet", "t", Set("ports", KEY)))
    assert fake.table("inet", "t") == Table("inet", "t", maps=(Map("m", KEY, VALUE),),
                                            comment="hns:x")


# the text is what nft accepts, with the same meaning (a throwaway network namespace)


def _nft(script: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"):
        pytest.skip("needs root, nft and unshare")
    return subprocess.run(["unshare", "--net", "nft", "-f", "-"], input=script,
                          capture_output=True, text=True, timeout=30, check=False)


def test_nft_applies_every_operation() -> None:
    nat = nat_table("hns-ab12", [NatSpec("a1", IPv4Network("172.16.0.0/20"), "hba")],
                    [PortMapSpec(6, 8080, IPv4Address("172.16.0.2"), 80)], owner="hns:x")
    tx = (Transaction().replace_table(nat).replace_table(base())
          .add_elements("inet", "t", "m", [element(80, "10.0.0.2")])
          .add_set("inet", "t", Set("s", KEY, (element(1),)))
          .add_chain("inet", "t", Chain("c", ("counter", "accept")))
          .flush_chain("inet", "t", "c").delete_chain("inet", "t", "c")
          .delete_elements("inet", "t", "m", [element(80)])
          .flush_set("inet", "t", Set("s", KEY)).delete_set("inet", "t", Set("s", KEY))
          .flush_table("inet", "t").destroy_table("inet", "t")
          .delete_elements("inet", "hns-ab12", "pm_any", [element(8080)]))
    FakeNft().run(tx)
    result = _nft(tx.render())
    assert result.returncode == 0, result.stderr
