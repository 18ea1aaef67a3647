from __future__ import annotations

import pytest

from dicomnode.config import SecuritySettings
from dicomnode.receive.policy import REJECT_CALLED_AET, REJECT_CALLING_AET, AccessPolicy


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
