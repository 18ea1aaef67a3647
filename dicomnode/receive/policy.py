"""Who may open an association: called AE title, calling AE titles, source hosts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dicomnode.config import SecuritySettings

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given


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
