"""Publish specs in Docker's syntax: round trips, Docker's examples, and every malformed spec
rejected with an InputError that names it. Pure parsing: no privileges, no kernel."""
import ipaddress
import warnings

import pytest
from hypothesis import given, settings, strategies as st

from nslab.errors import InputError
from nslab.publish import (CONTAINER_MODE_ERROR, HOST_MODE_WARNING, PortMapping,
                           PublishDiscardedWarning, check_publish_for_mode, format_publish,
                           parse_publish)

IP4 = ipaddress.IPv4Address

# --- what Docker accepts -----------------------------------------------------------------------
DOCKER_EXAMPLES = [
    ("80", [PortMapping(80)]),
    ("80/udp", [PortMapping(80, "udp")]),
    ("80/TCP", [PortMapping(80, "tcp")]),
    ("8080:80", [PortMapping(80, "tcp", 8080)]),
    (":80", [PortMapping(80)]),
    ("0:80", [PortMapping(80)]),
    ("127.0.0.1:8080:80", [PortMapping(80, "tcp", 8080, IP4("127.0.0.1"))]),
    ("127.0.0.1::80", [PortMapping(80, "tcp", None, IP4("127.0.0.1"))]),
    ("0.0.0.0:8080:80", [PortMapping(80, "tcp", 8080)]),
    ("192.0.2.1:53:53/udp", [PortMapping(53, "udp", 53, IP4("192.0.2.1"))]),
    ("8000-8001:80-81", [PortMapping(80, "tcp", 8000), PortMapping(81, "tcp", 8001)]),
    ("80-81", [PortMapping(80), PortMapping(81)]),
    ("8000-8010:80", [PortMapping(80, "tcp", 8000, None, 8010)]),
    ("080", [PortMapping(80)]),
    ("65535:1", [PortMapping(1, "tcp", 65535)]),
]


@pytest.mark.parametrize("spec,expected", DOCKER_EXAMPLES)
def test_docker_examples_parse_as_docker_does(spec, expected):
    """Each spelling Docker documents for `-p` gives the mappings Docker would make."""
    assert parse_publish(spec) == expected


def test_structured_forms_are_accepted():
    """PortMapping, int, dicts (nslab and Compose names), None and lists all parse."""
    m = PortMapping(80, "udp", 5353, "127.0.0.1")
    assert m.host_ip == IP4("127.0.0.1")
    assert parse_publish(m) == [m]
    assert parse_publish(80) == [PortMapping(80)]
    assert parse_publish(None) == []
    assert parse_publish({"container_port": 80, "host_port": 8080}) == [PortMapping(80, "tcp", 8080)]
    assert parse_publish({"target": 53, "published": "5353", "protocol": "udp",
                          "host_ip": "127.0.0.1"}) == [PortMapping(53, "udp", 5353, IP4("127.0.0.1"))]
    assert parse_publish({"target": 80, "published": "8000-8001"}) == [
        PortMapping(80, "tcp", 8000, None, 8001)]
    assert parse_publish(["80", 81, PortMapping(82)]) == [PortMapping(80), PortMapping(81),
                                                         PortMapping(82)]
    assert parse_publish(iter(["1"])) == [PortMapping(1)]


def test_format_is_docker_spelling():
    """format_publish writes what `docker port` would print, protocol included."""
    assert format_publish(PortMapping(80, "tcp", 8080)) == "8080:80/tcp"
    assert format_publish(PortMapping(53, "udp", None, IP4("127.0.0.1"))) == "127.0.0.1::53/udp"
    assert format_publish(PortMapping(80, "tcp", 8000, None, 8010)) == "8000-8010:80/tcp"
    assert str(PortMapping(80)) == "80/tcp"


# --- properties ----------------------------------------------------------------------------------
ports = st.integers(1, 65535)
ips = st.one_of(st.none(), st.integers(1, 2**32 - 1).map(IP4))


@st.composite
def mappings(draw):
    host = draw(st.one_of(st.none(), ports))
    end = None
    if host is not None and host < 65535 and draw(st.booleans()):
        end = draw(st.integers(host + 1, 65535))
    return PortMapping(draw(ports), draw(st.sampled_from(["tcp", "udp"])), host, draw(ips), end)


@settings(max_examples=300)
@given(mappings())
def test_format_then_parse_round_trips(m):
    """Any mapping written in Docker syntax reads back as itself."""
    assert parse_publish(format_publish(m)) == [m]


@st.composite
def docker_specs(draw):
    """A valid Docker -p string and the mappings it stands for."""
    c_start = draw(st.integers(1, 65000))
    c_len = draw(st.integers(1, 4))
    proto = draw(st.sampled_from(["", "/tcp", "/udp", "/UDP"]))
    p = (proto[1:] or "tcp").lower()
    ip = draw(ips)
    host_kind = draw(st.sampled_from(["none", "same", "pool"] if c_len == 1 else ["none", "same"]))
    cont = f"{c_start}" if c_len == 1 else f"{c_start}-{c_start + c_len - 1}"
    cports = range(c_start, c_start + c_len)
    if host_kind == "none":
        host, expected = "", [PortMapping(c, p, None, ip) for c in cports]
    elif host_kind == "same":
        h = draw(st.integers(1, 65535 - c_len))
        host = f"{h}" if c_len == 1 else f"{h}-{h + c_len - 1}"
        expected = [PortMapping(c, p, h + i, ip) for i, c in enumerate(cports)]
    else:
        h = draw(st.integers(1, 65000))
        e = draw(st.integers(h + 1, 65535))
        host, expected = f"{h}-{e}", [PortMapping(c_start, p, h, ip, e)]
    if ip is not None:
        text = f"{ip}:{host}:{cont}{proto}"
    else:
        text = f"{host}:{cont}{proto}" if host else f"{cont}{proto}"
    return text, expected


@settings(max_examples=300)
@given(docker_specs())
def test_docker_syntax_parses_and_round_trips(case):
    """Generated Docker specs parse to the expected mappings, each of which round-trips."""
    text, expected = case
    got = parse_publish(text)
    assert got == expected
    for m in got:
        assert parse_publish(format_publish(m)) == [m]


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=30),
                 st.text(alphabet="0123456789:-/.[]tcpudTCPUDsx ", max_size=25)))
def test_parser_is_total(text):
    """Arbitrary text either parses to valid mappings or raises InputError naming it, never
    anything else."""
    try:
        result = parse_publish(text)
    except InputError as exc:
        assert exc.field == "publish"
        assert repr(text) in str(exc)
        return
    assert result and all(isinstance(m, PortMapping) for m in result)
    for m in result:
        assert parse_publish(format_publish(m)) == [m]


# --- malformed specs: each one an InputError naming it ----------------------------------------------
MALFORMED_STRINGS = [
    # empty / whitespace / encoding
    "", " ", "80 ", " 80", "80\n", "\t80", "8080 :80", "8080: 80", "80\x00", "８０",
    "٨٠", "80\u200b", "8080:８0",
    # bad numbers
    "0", "65536", "99999", "100000", "-1", "-80", "+80", "80.0", "8e1", "0x50", "1_000",
    "abc", "http", "eighty", "80a", "a80", "8o", "80-", "-", "--", "80--90", "80-90-100",
    "90-80", "65535-65536", "0-10", "1-0", "80-a", "a-80",
    # protocols
    "80/", "80/sctp", "80/icmp", "80/tcp/udp", "80//tcp", "80/tc p", "/tcp", "/", "80/t",
    "80/TCPX", "80/udp4", "80/tcp6", "8080:80/", "8080:80/xyz", "8080/tcp:80",
    # host ports
    "65536:80", "0-5:80", "8080-8079:80", "a:80", "8080a:80", "-8080:80", "8080-:80",
    "99999:80", "8080:0", "8080:65536", "8080:", ":", "::", ":::", "8080::", "8080:-80",
    # ranges of different lengths
    "8080:80-81", "8000-8001:80-82", "8000-8002:80-81", "1-2:3-5", "10-20:30-31",
    "0:80-81", "8000:80-90/udp",
    # addresses
    "::80", "::8080:80", "1.2.3.4:80", "1.2.3.4:8080:80:", "256.0.0.1:80:80", "1.2.3:80:80",
    "1.2.3.4.5:80:80", "01.2.3.4:80:80", "localhost:80:80", "host:8080:80", "a.b.c.d:1:1",
    "1.2.3.4/24:80:80", "[::1]:80:80", "[::]:8080:80", "::1:80:80", "fe80::1:80:80",
    "[1.2.3.4]:80:80", "1.2.3.4::", "1.2.3.4::-1", "1.2.3.4:x:80", "1.2.3.-4:80:80",
    "1.2.3.4:8080:80:90", "1:2:3:4", "1.2.3.4:8080:80/sctp", "[::1]::80", "::ffff:1.2.3.4:80:80",
    "1.2.3.4 :80:80", "-1.2.3.4:80:80",
    # junk structure
    "80,81", "80;81", "80 81", "80|81", "'80'", '"80"', "${PORT}", "$(id)", "`id`", "80&",
    "80:80:80:80", "tcp/80", "80:tcp", "/80", "80/tcp:", "8080->80", "8080=>80", "8080=80",
    "{80}", "[80]", "80%", "80#", "#80", "8080:80 # web",
]

MALFORMED_VALUES = [
    b"80", bytearray(b"80"), 1.5, 80.0, True, False, 0, -1, 65536, 10**9, object(),
    complex(80), {1.5}, [[80]], [("8080", "80")], [b"80"], [None], [1.5], ["80", True],
    [{"x": 1}], {"x": 1}, {}, {"container_port": 0}, {"container_port": "80"},
    {"container_port": 80, "proto": "sctp"}, {"container_port": 80, "bogus": 1},
    {"container_port": 80, "host_ip": "::1"}, {"container_port": 80, "host_ip": 1},
    {"container_port": 80, "host_port": 70000}, {"container_port": 80, "host_port_end": 90},
    {"container_port": 80, "host_port": 90, "host_port_end": 80},
    {"container_port": 80, "proto": "TCP"}, {"container_port": True},
    {"target": 80, "published": 1.5}, {"target": None}, {"target": 80, "protocol": 6},
    {"target": 80, "mode": "swarm"}, {"target": 80, "published": "x"},
    {"target": 80, "host_ip": "::1", "published": 8080}, {"target": "80-81", "published": "1"},
    {"target": 80, "extra": 1}, {1: 2},
]

MALFORMED = MALFORMED_STRINGS + MALFORMED_VALUES


def test_malformed_corpus_is_big_enough():
    """The curated corpus holds at least 150 distinct malformed specs."""
    assert len(MALFORMED) >= 150


@pytest.mark.parametrize("spec", MALFORMED, ids=[f"m{i}" for i in range(len(MALFORMED))])
def test_malformed_spec_is_an_input_error_naming_it(spec):
    """Every malformed spec raises InputError(field='publish') whose message shows the spec."""
    with pytest.raises(InputError) as info:
        parse_publish(spec)
    assert info.value.field == "publish"
    message = str(info.value)
    if isinstance(spec, (list, tuple, set)):
        # The offending item is named.
        assert any(repr(item) in message for item in spec)
    else:
        assert repr(spec) in message


def test_bad_portmapping_fields_are_input_errors():
    """PortMapping itself refuses bad values with InputError, not TypeError."""
    for kwargs in ({"container_port": 0}, {"container_port": 80, "proto": "sctp"},
                   {"container_port": 80, "host_port": 0}, {"container_port": 80, "host_ip": "x"},
                   {"container_port": 80, "host_ip": ipaddress.IPv6Address("::1")},
                   {"container_port": 80, "host_port_end": 81}):
        with pytest.raises(InputError):
            PortMapping(**kwargs)
    with pytest.raises(InputError):
        format_publish("8080:80")


# --- Docker's rules for host and container modes -------------------------------------------------
def test_host_mode_discards_ports_with_dockers_warning():
    """Host mode: Docker's exact warning text is returned and emitted as a warning."""
    with pytest.warns(PublishDiscardedWarning) as record:
        text = check_publish_for_mode("host", parse_publish("8080:80"))
    assert text == "Published ports are discarded when using host network mode" == HOST_MODE_WARNING
    assert str(record[0].message) == HOST_MODE_WARNING
    assert issubclass(PublishDiscardedWarning, UserWarning)


def test_host_mode_strict_refuses():
    """Strict host mode raises InputError instead of discarding (moby#40608)."""
    with pytest.raises(InputError, match="discarded when using host network mode"):
        check_publish_for_mode("host", parse_publish("80"), strict=True)


def test_container_mode_refuses_with_dockers_wording():
    """container:X mode refuses publishing with Docker's error text."""
    for mode in ("container:web", "container"):
        with pytest.raises(InputError) as info:
            check_publish_for_mode(mode, parse_publish("8080:80"))
        assert "conflicting options: port publishing and the container type network mode" in \
            str(info.value)
        assert CONTAINER_MODE_ERROR in str(info.value)


def test_modes_without_ports_or_that_publish_say_nothing():
    """No ports, or bridge mode: no warning and no error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_publish_for_mode("host", []) is None
        assert check_publish_for_mode("container:x", None) is None
        assert check_publish_for_mode("bridge", parse_publish("80")) is None
