"""Where status callbacks may go: one rule, checked at create on the URL as written and
at delivery on the addresses its host resolves to.

Why: the dispatcher POSTs each callback with the service's own ``X-API-Key``, so a URL
aimed at the service itself, its neighbours or the cloud metadata address turns a
caller into a proxy with our credentials. Hence:

* always refused: userinfo (``user:pass@``), IP forms a browser or resolver reads
  differently from what a reader sees (integer ``2130706433``, hex ``0x7f000001``,
  octal ``0177.0.0.1``, short ``127.1``, zone ids), link-local (169.254/16, fe80::/10,
  the metadata address), unspecified, "this network" (0/8), multicast and reserved
  addresses, whatever the allow-list says;
* loopback and other non-global ranges (RFC 1918, CGNAT, ULA, documentation) only when
  allow-listed (``PAYMENTS_CALLBACK_ALLOWED_HOSTS``: the host's name, a ``*.suffix``
  wildcard, its address, or a CIDR range holding it); the embedded profile also allows
  loopback;
* with the allow-list set, only what it names: names and wildcards admit URLs written
  with a host name, addresses and CIDR ranges URLs written with an address. A listed
  name may resolve to a private address (the operator vouched for it), never to a
  link-local or unspecified one.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# WHATWG URL: a host whose last label is a number (decimal or 0x hex) is an IPv4 address.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_LOOPBACK_NAMES = ("localhost", ".localhost")
ALLOW_LIST_VARIABLE = "PAYMENTS_CALLBACK_ALLOWED_HOSTS"


class UrlRefused(ValueError):
    """A callback URL or address the rule refuses; the message says why."""


def _host_name(text: str) -> str:
    """A DNS name in ASCII (IDNA), lower-case, no trailing dot; UrlRefused otherwise."""
    try:
        name = text.encode("idna").decode("ascii").lower().rstrip(".")
    except (UnicodeError, ValueError):
        raise UrlRefused("has an invalid host name") from None
    labels = name.split(".")
    if not name or not all(_LABEL.fullmatch(label) for label in labels):
        raise UrlRefused("has an invalid host name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise UrlRefused("has a non-canonical IP address (write it as a.b.c.d)")
    return name


def parse_host(text: str) -> str | IPAddress:
    """A URL's host: a canonical IP address, or a host name (never a numeric look-alike)."""
    if ":" in text:
        if "%" in text:
            raise UrlRefused("has an IPv6 zone id")
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            raise UrlRefused("has an invalid IPv6 address") from None
    labels = text.rstrip(".").split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1].lower()):
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            address = None
        if address is None or str(address) != text:
            raise UrlRefused("has a non-canonical IP address (write it as a.b.c.d)")
        return address
    return _host_name(text)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def never_allowed(address: IPAddress) -> str:
    """Why ``address`` is refused whatever the allow-list says ('' if it is not)."""
    address = _unmapped(address)
    if address.is_unspecified or (
        isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK
    ):
        return "is an unspecified address"
    if address.is_link_local:
        return "is a link-local address"
    if address.is_multicast:
        return "is a multicast address"
    if address.is_reserved and not address.is_loopback:  # ::1 lies in reserved ::/8
        return "is a reserved address"
    return ""


@attrs.frozen
class CallbackPolicy:
    """The parsed allow-list (empty: any public host) plus the embedded profile's
    loopback allowance."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.com" for "*.example.com"
    networks: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = False

    @property
    def restricted(self) -> bool:
        return bool(self.names or self.suffixes or self.networks)

    def name_allowed(self, name: str) -> bool:
        return name in self.names or any(name.endswith(suffix) for suffix in self.suffixes)

    def address_problem(self, address: IPAddress, *, name_allowed: bool = False) -> str:
        """Why a callback may not go to ``address`` ('' when it may). ``name_allowed``:
        the URL's host name is on the allow-list (the operator vouched for it)."""
        if problem := never_allowed(address):
            return problem
        plain = _unmapped(address)
        if name_allowed or any(plain in network for network in self.networks):
            return ""
        if plain.is_loopback:
            allowed = self.allow_loopback
            return "" if allowed else f"is a loopback address (not in {ALLOW_LIST_VARIABLE})"
        if not plain.is_global:
            return f"is a private address (not in {ALLOW_LIST_VARIABLE})"
        return f"is not in {ALLOW_LIST_VARIABLE}" if self.restricted else ""

    def url_problem(self, url: str) -> str:
        """Why a callback may not be sent to ``url`` as written ('' when it may)."""
        try:
            check_url(url, self)
        except UrlRefused as exc:
            return str(exc)
        return ""


def split_url(url: str) -> SplitResult:
    """An absolute http(s) URL without userinfo, split; UrlRefused otherwise."""
    if any(ch.isspace() for ch in url):
        raise UrlRefused("must not contain spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused("is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused("must be an absolute http or https URL")
    if "@" in parts.netloc:
        raise UrlRefused("must not contain user:password@")
    if port == 0:
        raise UrlRefused("has an invalid port")
    return parts


def check_url(url: str, policy: CallbackPolicy) -> str | IPAddress:
    """Check ``url`` as written against ``policy``; its host (name or address)."""
    parts = split_url(url)
    host = parse_host(parts.hostname or "")
    if not isinstance(host, str):
        if problem := policy.address_problem(host):
            raise UrlRefused(f"host {problem}")
        return host
    allowed = policy.name_allowed(host)
    if host == _LOOPBACK_NAMES[0] or host.endswith(_LOOPBACK_NAMES[1]):
        if not (allowed or policy.allow_loopback):
            raise UrlRefused(f"host is a loopback name (not in {ALLOW_LIST_VARIABLE})")
    elif policy.restricted and not allowed:
        raise UrlRefused(f"host is not in {ALLOW_LIST_VARIABLE}")
    return host


def _entry(text: str) -> tuple[str, str | IPNetwork]:
    """One allow-list entry: ("name"|"suffix"|"network", value); ValueError if bad."""
    entry = text.strip().lower()
    if entry.startswith("*."):
        return "suffix", "." + _host_name(entry[2:])
    try:
        network = ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return "name", _host_name(entry)
    if never_allowed(network.network_address) or never_allowed(network.broadcast_address):
        raise UrlRefused(f"{network} holds addresses that are never allowed")
    return "network", network


@functools.lru_cache(maxsize=16)
def _parse(entries: tuple[str, ...], allow_loopback: bool) -> CallbackPolicy:
    names: set[str] = set()
    suffixes: list[str] = []
    networks: list[IPNetwork] = []
    for text in entries:
        try:
            kind, value = _entry(text)
        except UrlRefused as exc:
            raise ValueError(f"{text!r} {exc}") from None
        if kind == "name":
            names.add(str(value))
        elif kind == "suffix":
            suffixes.append(str(value))
        else:
            assert not isinstance(value, str)
            networks.append(value)
    return CallbackPolicy(frozenset(names), tuple(suffixes), tuple(networks), allow_loopback)


def parse_policy(entries: Iterable[str], *, allow_loopback: bool = False) -> CallbackPolicy:
    """The policy of ``PAYMENTS_CALLBACK_ALLOWED_HOSTS`` entries; ValueError naming a bad
    entry (checked at start by payments.config, so later calls only hit the cache)."""
    return _parse(tuple(e for e in entries if e.strip()), allow_loopback)
