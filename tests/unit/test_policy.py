from __future__ import annotations

import pytest

from dicomnode.config import NodeSettings, SecuritySettings
from dicomnode.receive.policy import (
    REJECT_CALLED_AET,
    REJECT_CALLING_AET,
    REJECT_LOCAL_LIMIT,
    AccessPolicy,
    Slots,
    host_key,
)


def _policy(**security: object) -> AccessPolicy:
    return AccessPolicy.from_settings("DICOMNODE", SecuritySettings(**security))


def test_open_policy_checks_only_the_called_title() -> None:
    policy = _policy()
    assert policy.check(calling_aet="ANY", called_aet="DICOMNODE", host="192.0.2.7") is None
    rejection = policy.check(calling_aet="ANY", called_aet="OTHER", host="192.0.2.7")
    assert rejection is not None and "'OTHER'" in rejection.reason
    assert (rejection.result, rejection.source, rejection.diagnostic) == REJECT_CALLED_AET


@pytest.mark.parametrize(
    "host,allowed",
    [
        ("10.1.2.3", True),
        ("10.255.0.1", True),
        ("192.168.0.1", False),
        ("::ffff:10.1.2.3", True),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("bogus", False),
    ],
)
def test_host_networks(host: str, allowed: bool) -> None:
    policy = _policy(allowed_hosts=["10.0.0.0/8", "2001:db8::/32"])
    result = policy.check(calling_aet="CT", called_aet="DICOMNODE", host=host)
    assert (result is None) == allowed


def test_calling_titles() -> None:
    policy = _policy(allowed_calling_aets=["CT1", "PACS"])
    assert policy.check(calling_aet="PACS ", called_aet="DICOMNODE", host="10.0.0.1") is None
    rejection = policy.check(calling_aet="EVIL", called_aet="DICOMNODE", host="10.0.0.1")
    assert rejection is not None and "'EVIL'" in rejection.reason
    assert (rejection.result, rejection.source, rejection.diagnostic) == REJECT_CALLING_AET


# -- association limits ----------------------------------------------------------------------


def _slots(**node: object) -> Slots:
    return Slots(NodeSettings(**node))


def test_limits_default_to_half_for_one_host_or_title() -> None:
    node = NodeSettings(max_associations=16)
    assert node.host_association_limit == node.aet_association_limit == 8
    assert node.pending_limit == 32 and node.host_pending_limit == 8
    assert NodeSettings(max_associations=1).host_association_limit == 1
    assert NodeSettings(max_associations=16, max_associations_per_host=3).host_pending_limit == 3


def test_one_host_leaves_room_for_another() -> None:
    slots = _slots(max_associations=4)  # 2 per host; 2 pending per host, 8 in all
    assert slots.connect("192.0.2.1") is None and slots.connect("192.0.2.1") is None
    refused_connection = slots.connect("192.0.2.1")
    assert refused_connection is not None and "max_pending_per_host" in refused_connection
    assert slots.admit("192.0.2.1", "A") is None
    assert slots.admit("192.0.2.1", "B") is None
    assert slots.connect("192.0.2.1") is None
    refused = slots.admit("192.0.2.1", "C")
    assert refused is not None and "max_associations_per_host" in refused.reason
    assert (refused.result, refused.source, refused.diagnostic) == REJECT_LOCAL_LIMIT
    assert slots.connect("192.0.2.9") is None
    assert slots.admit("192.0.2.9", "D") is None  # another host gets through
    slots.release("192.0.2.1", "A")
    assert slots.admit("192.0.2.1", "C") is None
    assert slots.associations == 3


def test_one_title_leaves_room_for_another() -> None:
    slots = _slots(max_associations=4)
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert slots.connect(host) is None
    assert slots.admit("192.0.2.1", "SPOOF") is None
    assert slots.admit("192.0.2.2", "SPOOF") is None
    refused = slots.admit("192.0.2.3", "SPOOF")
    assert refused is not None and "max_associations_per_aet" in refused.reason
    assert slots.admit("192.0.2.3", "CT1") is None


def test_pending_limits_in_all_and_per_host() -> None:
    slots = _slots(max_associations=16, max_pending_connections=5, max_pending_per_host=3)
    assert [slots.connect("192.0.2.1") for _ in range(3)] == [None] * 3
    refused = slots.connect("192.0.2.1")
    assert refused is not None and "max_pending_per_host" in refused
    assert slots.connect("192.0.2.2") is None and slots.connect("192.0.2.3") is None
    refused = slots.connect("192.0.2.4")
    assert refused is not None and "max_pending_connections" in refused
    slots.release("192.0.2.1", None)
    assert slots.connect("192.0.2.4") is None
    assert slots.pending == 5


def test_global_limit_still_applies() -> None:
    slots = _slots(max_associations=2, max_associations_per_host=2, max_pending_per_host=3)
    for host in ("192.0.2.1",) * 3:
        assert slots.connect(host) is None
    assert slots.admit("192.0.2.1", "A") is None and slots.admit("192.0.2.1", "B") is None
    refused = slots.admit("192.0.2.1", "C")
    assert refused is not None and "(max_associations)" in refused.reason


@pytest.mark.parametrize(
    "host,key",
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("bogus", "bogus"),
    ],
)
def test_hosts_are_counted_by_address_or_ipv6_64(host: str, key: str) -> None:
    assert host_key(host) == key
