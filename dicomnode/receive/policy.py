"""Who may open an association: called AE title, calling AE titles, source hosts."""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from dataclasses import dataclass

from dicomnode.config import NodeSettings, SecuritySettings

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
# transient, service provider (presentation related function), local limit exceeded
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
#: an IPv6 host usually holds a whole /64: counted per host, one address each would be no limit
IPV6_HOST_PREFIX = 64


@dataclass(frozen=True)
class Rejection:
    """Why an association is refused, and the A-ASSOCIATE-RJ to send."""

    reason: str
    result: int
    source: int
    diagnostic: int


@dataclass(frozen=True)
class AccessPolicy:
    """Decides, from the association request alone, whether a peer may connect."""

    ae_title: str
    allowed_calling_aets: frozenset[str]
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_settings(cls, ae_title: str, security: SecuritySettings) -> AccessPolicy:
        return cls(
            ae_title=ae_title,
            allowed_calling_aets=frozenset(security.allowed_calling_aets),
            allowed_networks=tuple(
                ipaddress.ip_network(h, strict=False) for h in security.allowed_hosts
            ),
        )

    def check(self, *, calling_aet: str, called_aet: str, host: str) -> Rejection | None:
        """Return the rejection for this request, or None to let it negotiate."""
        if called_aet.strip() != self.ae_title:
            return Rejection(
                f"called AE title {called_aet.strip()!r} is not {self.ae_title!r}",
                *REJECT_CALLED_AET,
            )
        if self.allowed_networks and not self._host_allowed(host):
            return Rejection(f"host {host} is not in security.allowed_hosts", *REJECT_NO_REASON)
        if self.allowed_calling_aets and calling_aet.strip() not in self.allowed_calling_aets:
            return Rejection(
                f"calling AE title {calling_aet.strip()!r} is not in security.allowed_calling_aets",
                *REJECT_CALLING_AET,
            )
        return None

    def _host_allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed_networks)


def busy(reason: str) -> Rejection:
    """A transient rejection: a limit is reached, the sender may try again later."""
    return Rejection(reason, *REJECT_LOCAL_LIMIT)


def host_key(host: str) -> str:
    """What the per-host limits count by: the IPv4 address (an IPv4-mapped one too), or the
    /64 of an IPv6 address (one host or LAN commonly holds them all)."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_HOST_PREFIX), strict=False))
    return str(address)


class Slots:
    """Counts connections not yet associated and open associations, in all, per host and per
    calling AE title, against the limits of ``[node]``; thread-safe.

    A connection takes a pending slot as it is accepted (:meth:`connect`), moves to an
    association slot when admitted (:meth:`admit`), and gives back whichever it holds when it
    ends (:meth:`release`). With every per-host and per-AE limit below its total, one host or
    AE title that misbehaves always leaves room for the others.
    """

    def __init__(self, node: NodeSettings) -> None:
        self.max_associations = node.max_associations
        self.per_host = node.host_association_limit
        self.per_aet = node.aet_association_limit
        self.max_pending = node.pending_limit
        self.pending_per_host = node.host_pending_limit
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._hosts: Counter[str] = Counter()
        self._aets: Counter[str] = Counter()
        self.pending = self.associations = 0

    def connect(self, host: str) -> str | None:
        """Take a pending slot for a connection from ``host``; or say which limit is reached."""
        key = host_key(host)
        with self._lock:
            if self.pending >= self.max_pending:
                return (
                    f"{self.pending} connections are not associated yet (max_pending_connections)"
                )
            if self._pending[key] >= self.pending_per_host:
                return (
                    f"{self._pending[key]} connections from {key} are not associated yet "
                    "(max_pending_per_host)"
                )
            self.pending += 1
            self._pending[key] += 1
        return None

    def admit(self, host: str, calling_aet: str) -> Rejection | None:
        """Move a connection from its pending slot to an association slot, unless a limit is
        reached (then it keeps its pending slot until it ends)."""
        key = host_key(host)
        with self._lock:
            if self.associations >= self.max_associations:
                return busy(
                    f"the maximum of {self.max_associations} associations is reached "
                    "(max_associations)"
                )
            if self._hosts[key] >= self.per_host:
                return busy(
                    f"host {key} already holds {self._hosts[key]} associations "
                    "(max_associations_per_host)"
                )
            if self._aets[calling_aet] >= self.per_aet:
                return busy(
                    f"calling AE title {calling_aet!r} already holds {self._aets[calling_aet]} "
                    "associations (max_associations_per_aet)"
                )
            self.associations += 1
            self._hosts[key] += 1
            self._aets[calling_aet] += 1
            self._drop(self._pending, key)
            self.pending -= 1
        return None

    def release(self, host: str, calling_aet: str | None) -> None:
        """Give back an association slot (``calling_aet`` given: it was admitted) or a pending
        one."""
        key = host_key(host)
        with self._lock:
            if calling_aet is None:
                self._drop(self._pending, key)
                self.pending -= 1
            else:
                self._drop(self._hosts, key)
                self._drop(self._aets, calling_aet)
                self.associations -= 1

    @staticmethod
    def _drop(counter: Counter[str], key: str) -> None:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]  # the counters hold only hosts and AE titles that hold something
