"""Which network addresses a source added over HTTP may reach (SSRF).

A remote caller may ask the daemon to pull a URL. It must not be able to make
the daemon reach its own loopback services, 0.0.0.0 (which Linux treats as
"this host"), link-local addresses or a cloud metadata endpoint. Private
ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) stay allowed:
cameras live there.

Names are resolved here and every address they resolve to must pass; callers
that connect afterwards must connect to one of the returned addresses, never
to the name again (a second lookup could answer differently: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import threading
from dataclasses import dataclass, field

__all__ = ["DEFAULT_DENY", "DestinationRefused", "NetworkPolicy"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What each default range is, for messages an operator can act on.
_KINDS: dict[str, str] = {
    "0.0.0.0/8": "a 'this host' (0.0.0.0/8) address",
    "127.0.0.0/8": "a loopback address",
    "169.254.0.0/16": "a link-local address",
    "100.100.100.200/32": "an Alibaba cloud metadata address",
    "192.0.0.0/24": "an IETF protocol (192.0.0.0/24) address",
    "224.0.0.0/4": "a multicast address",
    "240.0.0.0/4": "a reserved (240.0.0.0/4) address",
    "255.255.255.255/32": "the broadcast address",
    "::/128": "the unspecified address",
    "::1/128": "a loopback address",
    "fe80::/10": "a link-local address",
    "fd00:ec2::254/128": "an AWS cloud metadata address",
    "ff00::/8": "a multicast address",
}
DEFAULT_DENY: tuple[str, ...] = tuple(_KINDS)
# Inside a denied range but worth naming on its own.
_SPECIAL = {ipaddress.ip_address("169.254.169.254"): "a cloud metadata (link-local) address"}

_WHY = "not allowed for sources added over HTTP"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT (RFC 2765)
_COMPAT = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible form, ::a.b.c.d
# Letters, digits, dots, hyphens, underscores: anything else (spaces, '@', '%') is not a host
# name getaddrinfo should see (glibc's legacy parser accepts '127.0.0.1 junk', for one).
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]{1,253}")


class DestinationRefused(ValueError):
    """A destination the network policy does not allow; str() is one line saying why."""


def _parse_ip(text: str) -> IPAddress | None:
    """A literal IP in its standard notation (brackets and a %scope allowed), else None."""
    core = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    core = core.split("%", 1)[0]  # the scope (fe80::1%eth0) picks an interface, not an address
    try:
        return ipaddress.ip_address(core)
    except ValueError:
        return None


def _candidates(ip: IPAddress) -> list[IPAddress]:
    """The addresses a connection to `ip` may really reach, each judged on its own.

    An IPv4-mapped address is the IPv4 address (the kernel connects over IPv4);
    the other forms that embed an IPv4 address are judged both as themselves
    and by the IPv4 address they carry, since a translator on the path
    (NAT64, 6to4, SIIT) delivers them there.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    out: list[IPAddress] = [ip]
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or ip in _TRANSLATED or (ip in _COMPAT and int(ip) > 1):
        out.append(low32)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)  # (server, client); the client is the host reached
    return out


def _networks(cidrs: tuple[str, ...], what: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: not a network: {cidr!r} (expected a CIDR such as 10.0.0.0/8 or fd00::/8)") from None
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
            # ::ffff:a.b.c.d/n is written for IPv4 a.b.c.d/(n-96): mapped addresses are judged as IPv4.
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        out.append(net)
    return tuple(out)


@dataclass(frozen=True)
class NetworkPolicy:
    """Allowed and denied destination ranges (CIDRs); `allow` wins over `deny`.

    `allow` is for explicit exceptions, e.g. `("127.0.0.2/32",)` for a test
    camera on loopback. An address that embeds another (see `check_ip`) is
    allowed only when every address it may reach is.
    """

    deny: tuple[str, ...] = DEFAULT_DENY
    allow: tuple[str, ...] = ()
    _deny: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _allow: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lists from a config file become tuples: the policy stays hashable and immutable.
        object.__setattr__(self, "deny", tuple(self.deny))
        object.__setattr__(self, "allow", tuple(self.allow))
        # Parsed once: check_ip runs for every connection the egress proxy makes.
        object.__setattr__(self, "_deny", _networks(self.deny, "deny"))
        object.__setattr__(self, "_allow", _networks(self.allow, "allow"))

    def _denied_by(self, ip: IPAddress) -> IPNetwork | None:
        if any(ip.version == net.version and ip in net for net in self._allow):
            return None
        matches = [net for net in self._deny if ip.version == net.version and ip in net]
        return max(matches, key=lambda net: net.prefixlen) if matches else None  # the most specific names it best

    def _reason(self, ip: IPAddress) -> str | None:
        """Why `ip` is refused ('is a loopback address', 'embeds 127.0.0.1, a loopback address'), or None."""
        for candidate in _candidates(ip):
            net = self._denied_by(candidate)
            if net is None:
                continue
            what = _SPECIAL.get(candidate) or _KINDS.get(str(net)) or f"in the denied range {net}"
            return f"is {what}" if candidate == ip else f"embeds {candidate}, {what}"
        return None

    def check_ip(self, ip: str) -> None:
        """Raise DestinationRefused unless the literal address `ip` may be reached.

        Accepts IPv4 and IPv6 in standard notation, `[::1]` and scoped `fe80::1%eth0`.
        IPv4-mapped (`::ffff:127.0.0.1`), IPv4-compatible (`::127.0.0.1`), NAT64
        (`64:ff9b::7f00:1`), SIIT, 6to4 and Teredo forms are judged by the IPv4
        address they embed as well. Legacy IPv4 spellings (`127.1`, `2130706433`)
        are not literals here: `resolve` normalises them.
        """
        parsed = _parse_ip(ip)
        if parsed is None:
            raise DestinationRefused(f"{ip[:80]!r} is not an IP address")
        reason = self._reason(parsed)
        if reason is not None:
            raise DestinationRefused(f"{ip} {reason} ({_WHY})")

    def _judge(self, host: str, infos: list[tuple]) -> list[str]:
        addresses: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise DestinationRefused(f"cannot resolve {host!r} (no addresses)")
        for address in addresses:  # every answer must pass: one bad address refuses the name
            parsed = _parse_ip(address)
            reason = self._reason(parsed) if parsed is not None else "is not an IP address"
            if reason is not None:
                raise DestinationRefused(f"{host!r} resolves to {address}, which {reason} ({_WHY})")
        return addresses

    def _literal(self, host: str) -> list[str] | None:
        """Check a literal IP directly; None if `host` needs resolving. Raises for impossible names."""
        if not host:
            raise DestinationRefused("no host")
        parsed = _parse_ip(host)
        if parsed is not None:
            self.check_ip(host)
            bare = host[1:-1] if host.startswith("[") else host
            return [bare]
        if not _HOSTNAME.fullmatch(host):
            raise DestinationRefused(f"{host[:80]!r} is not a valid host name")
        return None

    def resolve(self, host: str, port: int, timeout: float = 5.0) -> list[str]:
        """Resolve `host` (blocking) and return its addresses; every one must pass.

        For decode threads. Legacy numeric forms (`127.1`, `0x7f000001`,
        `0177.0.0.1`, `2130706433`) go through getaddrinfo, which normalises
        them to the address they mean. A resolver error or timeout refuses.
        """
        literal = self._literal(host)
        if literal is not None:
            return literal
        done = threading.Event()
        result: list[object] = []

        def lookup() -> None:
            try:
                result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
            except (OSError, UnicodeError) as exc:
                result.append(exc)
            finally:
                done.set()

        # getaddrinfo has no timeout of its own. A daemon thread per lookup: a stuck resolver
        # leaves at most that thread behind and never blocks interpreter exit (an executor would).
        threading.Thread(target=lookup, name=f"resolve {host[:40]}", daemon=True).start()
        if not done.wait(timeout):
            raise DestinationRefused(f"cannot resolve {host!r} (no answer within {timeout:g} s)")
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise DestinationRefused(f"cannot resolve {host!r} ({_resolver_error(outcome)})")
        return self._judge(host, outcome)  # type: ignore[arg-type]

    async def aresolve(self, host: str, port: int, timeout: float = 5.0) -> list[str]:
        """`resolve` for the event loop (loop.getaddrinfo under a timeout)."""
        literal = self._literal(host)
        if literal is not None:
            return literal
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except TimeoutError:
            raise DestinationRefused(f"cannot resolve {host!r} (no answer within {timeout:g} s)") from None
        except (OSError, UnicodeError) as exc:
            raise DestinationRefused(f"cannot resolve {host!r} ({_resolver_error(exc)})") from None
        return self._judge(host, infos)


def _resolver_error(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
