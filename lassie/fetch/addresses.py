"""Which addresses a fetch from a user-given URL may reach: public internet addresses only, so a LoRA URL cannot make
the server probe its own network. Every answer for a name is checked (one refused answer refuses the host), IPv6 forms
that carry an IPv4 address are judged by it, and the operator's exceptions come from `LASSIE_ALLOW_PRIVATE_URLS`."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from lassie.settings import ALLOW_PRIVATE_ENV, IPNetwork, LoraSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
NUMERIC_IPV4 = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}", re.IGNORECASE)
REFUSED_CLASSES = ("unspecified", "loopback", "link-local", "multicast", "reserved", "private")  # in this order


class FetchError(RuntimeError):
    """A fetch failed; the message names the (redacted) URL or host and why; callers add what (a field, a variable)."""


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host spells by itself, old forms resolvers still honour (`2130706433`, `0x7f000001`) included."""
    bare = host.strip("[]")
    try:
        if NUMERIC_IPV4.fullmatch(bare):
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        return ipaddress.ip_address(bare)
    except (OSError, ValueError):
        return None


def address_refusal(address: IPAddress) -> str | None:
    """Why a fetch must not reach `address` (e.g. "loopback"), or None for a public address. An IPv6 address carrying
    an IPv4 one (mapped, 6to4, Teredo, NAT64) is refused for that one's reason too."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64_PREFIX
                    else address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None))
        reason = None if embedded is None else address_refusal(embedded)
        if reason is not None:
            return f"{reason} (as {address})"
    for name in REFUSED_CLASSES:
        if getattr(address, f"is_{name.replace('-', '_')}"):
            return name
    return None if address.is_global else "not publicly routable"


@dataclass(frozen=True)
class AddressRule:
    """The address rule plus the operator's exceptions: all addresses (tests, private mirrors) or networks listed."""

    allow_all: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: LoraSettings) -> AddressRule:
        return cls(allow_all=settings.allow_all_addresses, allowed_networks=settings.allowed_networks)

    def refusal(self, address: IPAddress) -> str | None:
        if self.allow_all or any(address in network for network in self.allowed_networks):
            return None
        return address_refusal(address)


def allowed_addresses(host: str, port: int, rule: AddressRule) -> list[IPAddress]:
    """Resolves once and checks every answer: a name resolving to a public and an internal address reaches neither."""
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise FetchError(f"could not resolve host {host!r} ({error})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(answer[4][0].split("%")[0]) for answer in answers))
    for address in addresses:
        if (reason := rule.refusal(address)) is not None:
            spelled = "" if host.strip("[]") == str(address) else f" (which is {address})"
            raise FetchError(f"refusing to fetch from {host}{spelled}: it is a {reason} address, and only public "
                             f"internet addresses are fetched (operators of private mirrors can set "
                             f"{ALLOW_PRIVATE_ENV})")
    return addresses
