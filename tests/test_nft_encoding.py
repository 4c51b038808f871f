"""nftables rule messages are packed by hand (the per-endpoint hot path): the bytes must be
the ones pyroute2's own encoder makes for the same rule, and the echoed handle must be
read back as pyroute2 decodes it. Unprivileged: nothing is sent to the kernel here (the
root tests in test_firewall.py read the resulting rulesets back with the real ``nft``)."""
import struct

import pytest
from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

from nslab import _nft
from nslab._nft import Dnat, Jump, Rule

RULES = [
    Rule("raw-PREROUTING", (("ip daddr", "==", "172.17.0.5"), ("iifname", "!=", "nslab0")),
         _nft.DROP, "DROP DIRECT ACCESS"),
    Rule("nat-PREROUTING", (("fib daddr type", "==", "local"),), Jump("DOCKER")),
    Rule("DOCKER", (("iifname", "!=", "nslab0"), ("tcp dport", "==", 8080)), Dnat("172.17.0.5", 80)),
    Rule("nat-POSTROUTING", (("ip saddr", "==", "172.17.0.0/16"), ("oifname", "!=", "nslab0")),
         _nft.MASQUERADE),
    Rule("filter-FORWARD", (("ct state", "==", ("established", "related")),), _nft.ACCEPT, counter=True),
]


class _pyroute2_rule(nft_rule_msg):
    """pyroute2's rule message with the expressions and userdata given pre-packed."""
    nla_map = tuple((name, "cdata") if name in ("NFTA_RULE_EXPRESSIONS", "NFTA_RULE_USERDATA")
                    else (name, kind) for name, kind in nft_rule_msg.nla_map)
    # pyroute2 compiles a class's nla_map once and marks it on the class; a subclass would
    # inherit the parent's mark (once anything used nft_rule_msg) and its map with it.
    _nlmsg_base__compiled_nla = False


def _by_pyroute2(table, rule, before):
    exprs, udata = _nft.compile_rule(rule)
    attrs = [("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", rule.chain), ("NFTA_RULE_EXPRESSIONS", exprs)]
    if udata is not None:
        attrs.append(("NFTA_RULE_USERDATA", udata))
    if before is not None:
        attrs.append(("NFTA_RULE_POSITION", before))
    msg = _pyroute2_rule()
    msg["nfgen_family"] = _nft.NFPROTO_IPV4
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[16:])


@pytest.mark.parametrize("before", [None, 7, 2**40 + 3])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.chain)
def test_new_rule_bytes_match_pyroute2(rule, before):
    exprs, udata = _nft.compile_rule(rule)
    ours = _nft.rule_message(_nft.NFPROTO_IPV4, "nslab-test", rule.chain, exprs, udata, before)
    assert ours == _by_pyroute2("nslab-test", rule, before)


def test_delete_rule_bytes_match_pyroute2():
    batch = _nft.Batch("nslab-test")
    batch.del_rule("raw-PREROUTING", 42)
    msg = nft_rule_msg()
    msg["nfgen_family"] = _nft.NFPROTO_IPV4
    msg["attrs"] = [("NFTA_RULE_TABLE", "nslab-test"), ("NFTA_RULE_CHAIN", "raw-PREROUTING"),
                    ("NFTA_RULE_HANDLE", 42)]
    msg.encode()
    assert batch.requests[0].raw == bytes(msg.data[16:])


def test_echoed_handle_is_read_as_pyroute2_reads_it():
    msg = nft_rule_msg()
    msg["nfgen_family"] = _nft.NFPROTO_IPV4
    msg["attrs"] = [("NFTA_RULE_TABLE", "nslab-test"), ("NFTA_RULE_CHAIN", "DOCKER"),
                    ("NFTA_RULE_HANDLE", 0x1_0000_0007)]
    msg.encode()
    data = bytes(msg.data)
    assert _nft.rule_handle(data) == 0x1_0000_0007
    assert _nft.rule_handle(memoryview(bytearray(data))) == 0x1_0000_0007   # as commit() reads it
    # No handle, a truncated attribute, a zero length: None, never an exception or a loop.
    assert _nft.rule_handle(data[:20]) is None
    assert _nft.rule_handle(data[:-3]) is None
    assert _nft.rule_handle(data[:20] + struct.pack("=HH", 0, 3) + b"\0" * 8) is None


def test_a_refused_rule_is_named_in_the_error_text():
    batch = _nft.Batch("nslab-test")
    batch.add_rule(RULES[0])
    assert str(batch.requests[0].what) == f"add rule raw-PREROUTING '{RULES[0].text()}'"
