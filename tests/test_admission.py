"""pyinetd.runtime.admission: access lists, per-source keys, rate limiting, log throttling."""

from __future__ import annotations

import ipaddress
import itertools
import math
import resource
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pyinetd.config.units import parse_duration, parse_rate, parse_size
from pyinetd.log import LogLimiter
from pyinetd.runtime.admission import (
    AccessList,
    Network,
    TokenBucket,
    in_access_times,
    parse_access_entry,
    source_key,
)

# ---------------------------------------------------------------- AccessList: parsing


@pytest.mark.parametrize(
    "bad", ["10.0.0.300", "10.0.0.0/33", "", "localhost", "1.2.3", "::1/129", "10.0.0.0/8/8"]
)
def test_parse_rejects_bad_entry_naming_it(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        AccessList.parse([bad], [])
    assert str(info.value) == f"{bad!r}: not an address or network"


def test_parse_rejects_bad_entry_in_deny_list() -> None:
    with pytest.raises(ValueError, match=r"^'10\.0\.0\.300': not an address or network$"):
        AccessList.parse(["127.0.0.1"], ["10.0.0.0/8", "10.0.0.300"])


@pytest.mark.parametrize("bad", [10, None, 1.5, True, ["10.0.0.1"]])
def test_parse_rejects_non_string_entry(bad: object) -> None:
    # YAML `allow: [10]` is an int; ipaddress would read it as 0.0.0.10, so refuse it.
    with pytest.raises(ValueError, match="not an address or network"):
        parse_access_entry(bad)


def test_parse_words_all_and_any_mean_both_families() -> None:
    for word in ("all", "any", "ALL", " Any "):
        assert parse_access_entry(word) == (
            ipaddress.ip_network("0.0.0.0/0"),
            ipaddress.ip_network("::/0"),
        )


def test_parse_ignores_host_bits_strict_false() -> None:
    assert parse_access_entry("10.1.2.3/8") == (ipaddress.ip_network("10.0.0.0/8"),)
    assert parse_access_entry("2001:db8::1/32") == (ipaddress.ip_network("2001:db8::/32"),)


def test_parse_bare_address_is_a_host_network() -> None:
    assert parse_access_entry(" 192.0.2.7 ") == (ipaddress.ip_network("192.0.2.7/32"),)
    assert parse_access_entry("::1") == (ipaddress.ip_network("::1/128"),)


def test_parse_mapped_v6_entry_becomes_v4_network() -> None:
    assert parse_access_entry("::ffff:10.0.0.0/104") == (ipaddress.ip_network("10.0.0.0/8"),)
    assert parse_access_entry("::ffff:192.0.2.1") == (ipaddress.ip_network("192.0.2.1/32"),)
    # A v6 network wider than the mapped block stays IPv6.
    assert parse_access_entry("::/64") == (ipaddress.ip_network("::/64"),)


def test_parse_lone_string_is_one_entry() -> None:
    assert AccessList.parse("all", "10.0.0.0/8") == AccessList.parse(["all"], ["10.0.0.0/8"])


def test_access_list_is_frozen_hashable_and_compares_by_entries() -> None:
    a = AccessList.parse(["127.0.0.0/8", "::1"], ["127.0.0.2"])
    b = AccessList.parse(["127.1.2.3/8", "0::1"], ["127.0.0.2/32"])
    assert a == b
    assert hash(a) == hash(b)
    assert a != AccessList.parse(["127.0.0.0/8"], [])
    with pytest.raises(FrozenInstanceError):
        a.allow = ()  # type: ignore[misc]


# ---------------------------------------------------------------- AccessList: decisions


def test_no_entries_permits_everyone() -> None:
    acl = AccessList.parse([], [])
    for peer in ("127.0.0.1", "10.1.2.3", "::1", "2001:db8::1", "::ffff:1.2.3.4", "", "/run/s"):
        assert acl.permits(peer)


def test_only_allow_denies_unmatched() -> None:
    acl = AccessList.parse(["127.0.0.0/8", "::1"], [])
    assert acl.permits("127.0.0.1")
    assert acl.permits("127.255.0.9")
    assert acl.permits("::1")
    assert not acl.permits("10.0.0.1")
    assert not acl.permits("::2")


def test_only_deny_permits_unmatched() -> None:
    acl = AccessList.parse([], ["10.0.0.0/8", "2001:db8::/32"])
    assert not acl.permits("10.9.9.9")
    assert not acl.permits("2001:db8:1::5")
    assert acl.permits("11.0.0.1")
    assert acl.permits("2001:db9::1")


def test_both_lists_unmatched_is_denied() -> None:
    # xinetd: only_from present => default deny, whatever no_access holds.
    acl = AccessList.parse(["127.0.0.0/8"], ["10.0.0.0/8"])
    assert not acl.permits("192.0.2.1")
    assert not acl.permits("::1")


def test_most_specific_entry_wins_across_lists() -> None:
    acl = AccessList.parse(["10.0.0.0/8", "10.1.2.0/24"], ["10.1.0.0/16", "10.1.2.3"])
    assert acl.permits("10.9.0.1")  # /8 allow
    assert not acl.permits("10.1.9.1")  # /16 deny beats /8 allow
    assert acl.permits("10.1.2.4")  # /24 allow beats /16 deny
    assert not acl.permits("10.1.2.3")  # /32 deny beats /24 allow


def test_all_deny_with_specific_allow() -> None:
    acl = AccessList.parse(["192.0.2.0/24", "2001:db8::/32"], ["all"])
    assert acl.permits("192.0.2.9")
    assert acl.permits("2001:db8::9")
    assert not acl.permits("198.51.100.1")
    assert not acl.permits("::1")


def test_tie_at_equal_prefix_deny_wins() -> None:
    acl = AccessList.parse(["10.0.0.0/8", "::1"], ["10.0.0.0/8", "0:0::1/128"])
    assert not acl.permits("10.1.1.1")
    assert not acl.permits("::1")
    # The same network spelled differently is still the same network.
    acl = AccessList.parse(["10.200.0.0/8"], ["10.0.0.0/8"])
    assert not acl.permits("10.0.0.1")


def test_mapped_peer_matched_as_v4() -> None:
    acl = AccessList.parse(["127.0.0.0/8"], ["127.0.0.2"])
    assert acl.permits("::ffff:127.0.0.1")
    assert not acl.permits("::ffff:127.0.0.2")
    assert not acl.permits("::ffff:10.0.0.1")
    assert acl.permits("::FFFF:7f00:1")  # the same address in hex form


def test_mapped_v6_entry_matches_plain_v4_peer() -> None:
    acl = AccessList.parse(["::ffff:10.0.0.0/104"], [])
    assert acl.permits("10.2.3.4")
    assert acl.permits("::ffff:10.2.3.4")
    assert not acl.permits("11.2.3.4")


def test_v6_entries_do_not_match_v4_peers() -> None:
    # A v4 client gets the same decision on a v4-only and on a dual-stack listener, so ::/0
    # (which numerically contains ::ffff:0:0/96) does not cover mapped peers.
    acl = AccessList.parse([], ["::/0"])
    assert acl.permits("1.2.3.4")
    assert acl.permits("::ffff:1.2.3.4")
    assert not acl.permits("::1")


def test_peer_with_scope_id() -> None:
    acl = AccessList.parse(["fe80::/10"], [])
    assert acl.permits("fe80::1%eth0")
    assert acl.permits("febf::1%eth0")  # last /16 inside fe80::/10
    assert not acl.permits("fec0::1%eth0")
    assert not acl.permits("2001:db8::1%3")


def test_unix_peers_get_the_default_decision() -> None:
    assert AccessList.parse([], ["all"]).permits("")  # deny-only: nothing matches -> permit
    assert AccessList.parse([], ["all"]).permits("/run/sock")
    assert not AccessList.parse(["all"], []).permits("")  # allow present -> default deny
    assert not AccessList.parse(["127.0.0.1"], []).permits("/run/sock")


def test_sockaddr_tuple_is_a_type_error_not_a_unix_peer() -> None:
    acl = AccessList.parse([], ["10.0.0.0/8"])
    with pytest.raises(TypeError):
        acl.permits(("10.0.0.1", 5000))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        source_key(("10.0.0.1", 5000))  # type: ignore[arg-type]


def test_direct_construction_unmaps_networks() -> None:
    acl = AccessList(allow=(ipaddress.IPv6Network("::ffff:0:0/96"),))
    assert acl.permits("8.8.8.8")
    assert not acl.permits("::1")


# ---------------------------------------------------------------- AccessList vs brute force


def _reference_unmap(net: Network) -> Network:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def _reference_permits(allow: list[Network], deny: list[Network], addr: str) -> bool:
    """Check every entry, keep the longest match, deny on ties: obviously right, slow."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(addr)
    except ValueError:
        return not allow
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    best: tuple[int, bool] | None = None
    for nets, is_deny in ((allow, False), (deny, True)):
        for net in nets:
            net = _reference_unmap(net)
            if net.version == ip.version and ip in net:
                candidate = (net.prefixlen, is_deny)
                best = candidate if best is None else max(best, candidate)
    if best is None:
        return not allow
    return not best[1]


# Cluster addresses so random networks overlap and nest, which is where the bugs would be.
_v4_ints = st.one_of(
    st.integers(0x0A000000, 0x0A0003FF),  # 10.0.0.0 - 10.0.3.255
    st.integers(0, 2**32 - 1),
)
_v6_ints = st.one_of(
    st.integers(0x20010DB8 << 96, (0x20010DB8 << 96) + 0xFFFF),
    st.integers(0, 2**128 - 1),
)
_v4_nets = st.builds(
    lambda n, p: ipaddress.IPv4Network((n, p), strict=False), _v4_ints, st.integers(0, 32)
)
_v6_nets = st.builds(
    lambda n, p: ipaddress.IPv6Network((n, p), strict=False), _v6_ints, st.integers(0, 128)
)
_mapped_nets = st.builds(
    lambda n, p: ipaddress.IPv6Network(((0xFFFF << 32) | n, 96 + p), strict=False),
    _v4_ints,
    st.integers(0, 32),
)
_nets = st.one_of(_v4_nets, _v6_nets, _mapped_nets)
_peers = st.one_of(
    _v4_ints.map(lambda n: str(ipaddress.IPv4Address(n))),
    _v4_ints.map(lambda n: str(ipaddress.IPv6Address((0xFFFF << 32) | n))),
    _v6_ints.map(lambda n: str(ipaddress.IPv6Address(n))),
    st.sampled_from(["", "/run/pyinetd.sock"]),
)


@settings(max_examples=300)
@given(
    allow=st.lists(_nets, max_size=6),
    deny=st.lists(_nets, max_size=6),
    peers=st.lists(_peers, min_size=1, max_size=10),
)
def test_access_list_agrees_with_brute_force(
    allow: list[Network], deny: list[Network], peers: list[str]
) -> None:
    acl = AccessList.parse([str(n) for n in allow], [str(n) for n in deny])
    # Also probe the edges of every entry, where off-by-one masks would show.
    for net in (*allow, *deny):
        peers = [*peers, str(net.network_address), str(net.broadcast_address)]
    for peer in peers:
        assert acl.permits(peer) == _reference_permits(allow, deny, peer), peer


@given(net=_v4_nets, host=st.integers(0, 2**32 - 1))
def test_v4_entry_decides_mapped_and_plain_peer_alike(
    net: ipaddress.IPv4Network, host: int
) -> None:
    plain = str(ipaddress.IPv4Address(host))
    mapped = str(ipaddress.IPv6Address((0xFFFF << 32) | host))
    for acl in (AccessList.parse([str(net)], []), AccessList.parse([], [str(net)])):
        assert acl.permits(plain) == acl.permits(mapped)


# ---------------------------------------------------------------- source_key


@pytest.mark.parametrize(
    ("peer", "prefix", "key"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6/128"),
        ("2001:db8:1:2:3:4:5:6", 0, "::/0"),
        ("::1", 64, "::/64"),
        ("fe80::1:2%eth0", 64, "fe80::/64"),
        ("", 64, ""),
        ("/run/pyinetd.sock", 64, ""),
    ],
)
def test_source_key(peer: str, prefix: int, key: str) -> None:
    assert source_key(peer, prefix) == key


def test_source_key_default_prefix_is_64() -> None:
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_key("2001:db8:0:1::1") != source_key("2001:db8::1")


@pytest.mark.parametrize("prefix", [-1, 129])
def test_source_key_rejects_bad_prefix(prefix: int) -> None:
    with pytest.raises(ValueError, match="0-128"):
        source_key("::1", prefix)


@given(a=st.integers(0, 2**128 - 1), b=st.integers(0, 2**128 - 1), prefix=st.integers(0, 128))
def test_source_key_groups_v6_by_prefix(a: int, b: int, prefix: int) -> None:
    pa, pb = ipaddress.IPv6Address(a), ipaddress.IPv6Address(b)
    assume(pa.ipv4_mapped is None and pb.ipv4_mapped is None)
    ka, kb = source_key(str(pa), prefix), source_key(str(pb), prefix)
    assert pa in ipaddress.IPv6Network(ka)
    assert ipaddress.IPv6Network(ka).prefixlen == prefix
    same_net = (a >> (128 - prefix)) == (b >> (128 - prefix)) if prefix else True
    assert (ka == kb) == same_net


# ---------------------------------------------------------------- TokenBucket


def test_bucket_starts_full_then_refuses() -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=5)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=2)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)  # one token after 1/rate
    assert not bucket.take(0.1)
    assert bucket.take(0.3) and bucket.take(0.3) and not bucket.take(0.3)


def test_bucket_never_holds_more_than_burst() -> None:
    bucket = TokenBucket(rate_per_s=1000.0, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [True] * 3
    assert [bucket.take(1e6) for _ in range(4)] == [True] * 3 + [False]


def test_bucket_slow_rate() -> None:
    rate, burst = parse_rate("2/min")
    bucket = TokenBucket(rate, burst)
    assert bucket.take(0.0) and not bucket.take(29.0)
    assert bucket.take(30.0)


def test_bucket_clock_going_backwards_mints_nothing_and_recovers() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=2)
    assert bucket.take(1000.0) and bucket.take(1000.0)
    assert not bucket.take(10.0)  # stepped back: no refill, no error
    assert bucket.tokens == 0.0
    assert not bucket.take(10.5)
    assert bucket.take(11.0)  # refills from the new reference, not from 1000.0


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0), (1.0, True)]
)
def test_bucket_rejects_bad_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


_rates = st.floats(0.01, 1000.0)
_bursts = st.integers(1, 50)


@settings(max_examples=200)
@given(rate=_rates, burst=_bursts, gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=120))
def test_bucket_never_admits_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now, times, admitted = 5000.0, [], []
    for gap in gaps:
        now += gap
        times.append(now)
        admitted.append(bucket.take(now))
    for i in range(len(times)):
        count = 0
        for j in range(i, len(times)):
            count += admitted[j]
            assert count <= burst + rate * (times[j] - times[i]) + 1e-6


@given(rate=_rates, burst=_bursts, n=st.integers(1, 60))
def test_bucket_admits_everything_spaced_at_the_rate(rate: float, burst: int, n: int) -> None:
    bucket = TokenBucket(rate, burst)
    step = (1.0 / rate) * (1 + 1e-9)
    assert all(bucket.take(1.0 + i * step) for i in range(n))


@given(rate=_rates, burst=_bursts, times=st.lists(st.floats(-1e6, 1e6), max_size=100))
def test_bucket_tokens_stay_in_range_whatever_the_clock_does(
    rate: float, burst: int, times: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    for now in times:
        bucket.take(now)
        assert 0.0 <= bucket.tokens <= burst


# ---------------------------------------------------------------- parse_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50/s", (50.0, 50)),
        ("50/sec", (50.0, 50)),
        ("50/second", (50.0, 50)),
        (" 50 / S ", (50.0, 50)),
        ("50", (50.0, 50)),
        (50, (50.0, 50)),
        (2.5, (2.5, 2)),
        ("1.5/s", (1.5, 1)),
        ("0.5/s", (0.5, 1)),
        ("600/min", (10.0, 10)),
        ("600/m", (10.0, 10)),
        ("600/minute", (10.0, 10)),
        ("600/minutes", (10.0, 10)),
        ("30/min", (0.5, 1)),
        ("7200/h", (2.0, 2)),
        ("7200/hour", (2.0, 2)),
        ("7200/hr", (2.0, 2)),
    ],
)
def test_parse_rate(text: str, expected: tuple[float, int]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "0/s",
        "0",
        "-5/s",
        "5/fortnight",
        "5/ms",
        "5/",
        "/s",
        "inf/s",
        "nan",
        "5/s/s",
        0,
        -1,
        math.inf,
        math.nan,
        True,
        None,
        [50],
    ],
)
def test_parse_rate_rejects(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_rate(bad)  # type: ignore[arg-type]
    assert str(info.value).startswith(f"{bad!r}: expected a positive rate")


# ---------------------------------------------------------------- LogLimiter


def test_log_limiter_once_per_interval_with_suppressed_count() -> None:
    limiter = LogLimiter(interval=60.0)
    assert limiter.should_log("10.0.0.1", 0.0) == (True, 0)
    assert limiter.should_log("10.0.0.1", 1.0) == (False, 1)
    assert limiter.should_log("10.0.0.1", 59.9) == (False, 2)
    assert limiter.should_log("10.0.0.1", 60.0) == (True, 2)
    assert limiter.should_log("10.0.0.1", 61.0) == (False, 1)
    assert limiter.should_log("10.0.0.1", 200.0) == (True, 1)
    assert limiter.should_log("10.0.0.1", 300.0) == (True, 0)


def test_log_limiter_keys_are_independent() -> None:
    limiter = LogLimiter(interval=60.0)
    assert limiter.should_log("a", 0.0) == (True, 0)
    assert limiter.should_log("b", 1.0) == (True, 0)
    assert limiter.should_log("a", 2.0) == (False, 1)
    assert limiter.should_log("b", 3.0) == (False, 1)


def test_log_limiter_memory_is_bounded_under_random_address_flood() -> None:
    limiter = LogLimiter(interval=60.0, max_keys=64)
    for i in range(20_000):
        limiter.should_log(str(ipaddress.IPv4Address(i * 2654435761 % 2**32)), i / 1000)
        assert len(limiter) <= 64
    assert len(limiter) == 64


def test_log_limiter_evicts_least_recently_seen() -> None:
    limiter = LogLimiter(interval=60.0, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.should_log(key, 0.0)
    assert limiter.should_log("a", 1.0) == (False, 1)  # a is now the most recently seen
    assert limiter.should_log("d", 2.0) == (True, 0)  # evicts b
    assert limiter.should_log("a", 3.0) == (False, 2)  # still remembered
    assert limiter.should_log("b", 4.0) == (True, 0)  # forgotten, so logged again


def test_log_limiter_clock_going_backwards_stays_quiet_then_recovers() -> None:
    limiter = LogLimiter(interval=60.0)
    assert limiter.should_log("k", 1000.0) == (True, 0)
    assert limiter.should_log("k", 10.0) == (False, 1)
    assert limiter.should_log("k", 69.0) == (False, 2)
    assert limiter.should_log("k", 70.0) == (True, 2)  # one interval after the step, not 1060


def test_log_limiter_zero_interval_logs_everything() -> None:
    limiter = LogLimiter(interval=0.0)
    assert [limiter.should_log("k", 5.0) for _ in range(3)] == [(True, 0)] * 3


@pytest.mark.parametrize(("interval", "max_keys"), [(-1.0, 10), (math.nan, 10), (60.0, 0)])
def test_log_limiter_rejects_bad_parameters(interval: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        LogLimiter(interval, max_keys)


@given(
    interval=st.floats(0.0, 100.0),
    events=st.lists(st.tuples(st.sampled_from("abcde"), st.floats(0.0, 50.0)), max_size=200),
)
def test_log_limiter_accounts_for_every_event(
    interval: float, events: list[tuple[str, float]]
) -> None:
    limiter = LogLimiter(interval=interval)
    now = 0.0
    logged_at: dict[str, list[float]] = {}
    reported: dict[str, int] = {}
    pending: dict[str, int] = {}
    for key, gap in events:
        now += gap
        log, count = limiter.should_log(key, now)
        if log:
            logged_at.setdefault(key, []).append(now)
            reported[key] = reported.get(key, 0) + 1 + count
            pending[key] = 0
        else:
            pending[key] = count
    for key, times in logged_at.items():
        # Logged lines for one key are at least an interval apart...
        assert all(b - a >= interval for a, b in itertools.pairwise(times))
        # ...and every event is either logged, reported as suppressed, or still pending.
        total = sum(1 for k, _ in events if k == key)
        assert reported[key] + pending[key] == total


# ---------------------------------------------------------------- parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("30 sec", 30.0),
        ("30 seconds", 30.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("5min", 300.0),
        ("2 minutes", 120.0),
        ("1h", 3600.0),
        ("1H", 3600.0),
        ("2 hours", 7200.0),
        ("1d", 86400.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "-1",
        "-1s",
        "5x",
        "1.5.5s",
        "s",
        "1e3",
        "5 m s",
        "inf",
        "nan",
        -1,
        -0.5,
        math.inf,
        math.nan,
        True,
        False,
        None,
        [30],
    ],
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(bad)  # type: ignore[arg-type]
    assert str(info.value).startswith(f"{bad!r}: expected a duration")


@given(n=st.integers(0, 10**6))
def test_parse_duration_units_scale(n: int) -> None:
    assert parse_duration(f"{n}ms") == pytest.approx(n / 1000)
    assert parse_duration(f"{n}m") == n * 60.0
    assert parse_duration(str(n)) == parse_duration(n) == float(n)


# ---------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (100, 100),
        (0, 0),
        ("100", 100),
        ("100b", 100),
        ("64k", 64 * 1024),
        ("64K", 64 * 1024),
        ("64KiB", 64 * 1024),
        ("512M", 512 * 1024**2),
        ("512 MB", 512 * 1024**2),
        ("8m", 8 * 1024**2),
        ("1G", 1024**3),
        ("1.5G", 1536 * 1024**2),
        ("2T", 2 * 1024**4),
        ("0.5k", 512),
        (str(2**63 - 1), 2**63 - 1),
        ("8191P", 8191 * 1024**5),
        ("unlimited", resource.RLIM_INFINITY),
        ("Infinity", resource.RLIM_INFINITY),
        (" UNLIMITED ", resource.RLIM_INFINITY),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "-1",
        "0.3k",
        "1.5",
        "12x",
        "1e3",
        "8E",
        "8192P",
        "1 G B",
        "9" * 5000,
        -1,
        2**63,
        1.5,
        True,
        None,
        ["1G"],
    ],
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(bad)  # type: ignore[arg-type]
    assert str(info.value).startswith(f"{bad!r}: expected a whole size")


@given(n=st.integers(0, 2**20), unit=st.sampled_from(["", "k", "m", "g", "t"]))
def test_parse_size_units_scale(n: int, unit: str) -> None:
    power = ["", "k", "m", "g", "t"].index(unit)
    assert parse_size(f"{n}{unit}") == parse_size(f"{n}{unit.upper()}") == n * 1024**power


def test_log_limiter_max_lines_bounds_rotating_keys_and_counts_what_it_holds_back() -> None:
    # 5,000 rotating sources through a 4,096-entry table were each logged every time
    limiter = LogLimiter(interval=60.0, max_keys=4096, max_lines=100)
    logged = sum(
        limiter.should_log(f"10.0.{i // 250}.{i % 250}", i / 1000)[0] for i in range(15000)
    )
    assert logged == 100
    assert limiter.take_overflow() == 15000 - 100 - 0  # new keys held back (none seen twice)
    assert limiter.take_overflow() == 0
    # a key already logged is suppressed as before, and counted on its own key
    assert limiter.should_log("10.0.0.0", 30.0) == (False, 1)
    # the next interval has room again; the first key back reports its own count
    assert limiter.should_log("10.0.0.0", 61.0) == (True, 1)
    assert limiter.should_log("fresh", 61.5) == (True, 0)


def test_log_limiter_max_lines_holds_a_due_key_until_there_is_room() -> None:
    limiter = LogLimiter(interval=10.0, max_lines=1)
    assert limiter.should_log("a", 0.0) == (True, 0)
    assert limiter.should_log("b", 1.0) == (False, 0)  # no room: held back, counted
    assert limiter.take_overflow() == 1
    assert limiter.should_log("b", 10.0) == (True, 0)  # a new interval: room for one
    assert limiter.should_log("a", 10.5) == (False, 1)  # due, but no room: suppressed
    assert limiter.should_log("a", 20.0) == (True, 1)


# ---------------------------------------------------------------- admit(): the one decision


def _state(svc: dict[str, object]) -> object:
    """A real ServiceState for a service built from ``svc`` (no loop, no sockets)."""
    from pathlib import Path

    from pyinetd.config import build
    from pyinetd.runtime.services import ServiceState

    config = build({"services": {"s": {"listen": "127.0.0.1:7", **svc}}}, Path("/x/inetd.yaml"))
    state = ServiceState(config.services[0])
    state.set_service(config.services[0])
    return state


def test_admit_checks_in_order_deny_limit_max_children_per_source_rate() -> None:
    from pyinetd.runtime.admission import Known, admit
    from pyinetd.runtime.services import ServiceState

    state = _state(
        {
            "exec": "/bin/cat",
            "deny": ["10.0.0.0/8"],
            "max_connections": 2,
            "per_source": 1,
            "rate": "1/s",
        }
    )
    assert isinstance(state, ServiceState)
    svc = state.service
    assert admit(svc, state, Known("10.1.2.3", 0.0)) == ("deny", "")
    assert admit(svc, state, Known("192.0.2.1", 0.0, full=True)) == ("max_children", "")
    assert admit(svc, state, Known("192.0.2.1", 0.0)) == (None, "192.0.2.1")
    state.running, state.sources["192.0.2.1"] = 1, 1  # one running from it
    assert admit(svc, state, Known("192.0.2.1", 0.0)) == ("per_source", "192.0.2.1")
    assert admit(svc, state, Known("192.0.2.2", 0.0)) == ("rate", "192.0.2.2")
    assert admit(svc, state, Known("192.0.2.2", 5.0)) == (None, "192.0.2.2")
    state.running, state.sources["192.0.2.2"] = 2, 1
    assert admit(svc, state, Known("192.0.2.3", 9.0)) == ("limit", "")


def test_admit_without_a_token_leaves_the_bucket_alone() -> None:
    """A TLS connection is checked before its ClientHello without taking a rate token (the
    hello may never come), then admitted with one at the fork."""
    from pyinetd.runtime.admission import Known, admit
    from pyinetd.runtime.services import ServiceState

    state = _state({"exec": "/bin/cat", "rate": "1/s"})
    assert isinstance(state, ServiceState)
    for _ in range(3):
        assert admit(state.service, state, Known("192.0.2.1", 0.0, take_token=False))[0] is None
    assert admit(state.service, state, Known("192.0.2.1", 0.0))[0] is None
    assert admit(state.service, state, Known("192.0.2.1", 0.0))[0] == "rate"


def test_admit_refuses_datagrams_that_would_loop() -> None:
    """From one of our UDP built-ins' ports (issue 18.1), or from a privileged port to a
    built-in (CERT CA-1996-01); an exec service may answer a privileged port."""
    from pyinetd.runtime.admission import Known, admit
    from pyinetd.runtime.services import ServiceState

    echo = _state({"protocol": "udp", "builtin": "echo"})
    cat = _state({"protocol": "udp", "exec": "/bin/cat"})
    assert isinstance(echo, ServiceState) and isinstance(cat, ServiceState)
    ours = frozenset({7007})
    assert (
        admit(echo.service, echo, Known("127.0.0.1", 0.0, datagram_port=7007, loop_ports=ours))[0]
        == "loop"
    )
    assert (
        admit(cat.service, cat, Known("127.0.0.1", 0.0, datagram_port=7007, loop_ports=ours))[0]
        == "loop"
    )
    assert (
        admit(echo.service, echo, Known("127.0.0.1", 0.0, datagram_port=19, loop_ports=ours))[0]
        == "loop"
    )
    assert (
        admit(cat.service, cat, Known("127.0.0.1", 0.0, datagram_port=19, loop_ports=ours))[0]
        is None
    )
    assert (
        admit(echo.service, echo, Known("127.0.0.1", 0.0, datagram_port=40000, loop_ports=ours))[0]
        is None
    )


# ---------------------------------------------------------------- access_times, max_load


@pytest.mark.parametrize(
    ("minute", "inside"),
    [(479, False), (480, True), (720, True), (721, False), (1320, True), (0, True), (121, False)],
)
def test_access_times_include_both_ends_and_may_pass_midnight(minute: int, inside: bool) -> None:
    # 08:00-12:00 and 22:00-02:00, as xinetd's access_times: 12:00 is in, 12:01 is not.
    assert in_access_times(((480, 720), (1320, 120)), minute) is inside
