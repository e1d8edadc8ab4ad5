"""The network guard: which hosts and addresses a plan's network tools may reach
(docs/policy.md).

Every connection ``http.request`` opens (the first request and each redirect) goes
through ``GuardedBackend``: the host name is resolved once, every address it resolves to
is checked against the level's policy, and the connection is made to a checked address,
never to the name again, so a DNS answer that changes between the check and the
connection (DNS rebinding) cannot slip through. TLS still verifies the name and the
``Host`` header keeps it.

The rules, in order: a ``submitted`` plan never reaches the Prefect API or the bridge
(``PREFECT_API_URL``, ``PLANRUN_BRIDGE_URL``); when the level lists ``hosts``, the
connection must match one; unless the level has ``allow_private``, no resolved address
may be loopback, link-local (cloud metadata at 169.254.169.254), private, shared (CGNAT),
unspecified, multicast or reserved, written plainly or inside an IPv6 form (IPv4-mapped,
6to4, Teredo, NAT64). A refusal is a ConfigurationError ("blocked by policy: ..."),
which is not retried.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx

from planrun.errors import ConfigurationError, TransientError
from planrun.policy import LevelPolicy, Trust

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Resolves ``(host, port)`` to addresses; tests inject their own.
Resolver = Callable[[str, int], Awaitable[list[Address]]]

DEFAULT_BRIDGE_URL = "http://127.0.0.1:8765"
HINT = ("the operator's policy does not let this plan reach that address; use another "
        "host, or ask the operator to change the policy (docs/policy.md)")

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def blocked(reason: str) -> ConfigurationError:
    """The error every refusal raises."""
    return ConfigurationError(f"blocked by policy: {reason}", hint=HINT)


# -- addresses ----------------------------------------------------------------------------

def denied_range(address: Address) -> str | None:
    """The name of the non-public range ``address`` is in (looking through IPv6 forms
    that carry an IPv4 address), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return denied_range(address.ipv4_mapped)  # the IPv4 address is what is reached
    for inner in _embedded(address):
        found = denied_range(inner)
        if found:
            return found
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata)"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "shared (CGNAT)"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def _embedded(address: Address) -> list[Address]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[Address] = [address.sixtofour] if address.sixtofour else []
    if address.teredo:
        found.append(address.teredo[1])
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def literal_address(host: str) -> Address | None:
    """``host`` as an address, if it is one (``[::1]`` included)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_local_name(host: str) -> bool:
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


# -- the Prefect API and the bridge --------------------------------------------------------

def own_services() -> list[tuple[str, str, int]]:
    """``(what, host, port)`` of the Prefect API and the bridge this process talks to."""
    urls = [("the Prefect API", _prefect_api_url()),
            ("the planrun bridge", os.environ.get("PLANRUN_BRIDGE_URL") or DEFAULT_BRIDGE_URL)]
    services = []
    for what, url in urls:
        try:
            parsed = httpx.URL(url) if url else None
        except httpx.InvalidURL:
            continue
        if parsed is not None and parsed.host:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            services.append((what, parsed.host.lower(), port))
    return services


def _prefect_api_url() -> str | None:
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect" not in sys.modules:  # never import Prefect just to ask
        return None
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def service_reached(host: str, port: int, addresses: Iterable[Address]) -> str | None:
    """Which of ``own_services()`` a connection to ``host:port`` (resolved to
    ``addresses``) would reach, if any. A service on a loopback or unspecified address is
    reached through every loopback address and, for unspecified, every local one."""
    addresses = list(addresses)
    for what, service_host, service_port in own_services():
        if port != service_port:
            continue
        if host.lower() == service_host:
            return what
        if any(a in _service_addresses(service_host) for a in addresses):
            return what
        if _is_local_host(service_host) and any(a.is_loopback or a.is_unspecified
                                                for a in addresses):
            return what
    return None


def _service_addresses(host: str) -> set[Address]:
    address = literal_address(host)
    if address is None:
        return set()
    if address.is_unspecified:
        return _local_addresses() | {address}
    return {address}


def _is_local_host(host: str) -> bool:
    address = literal_address(host)
    if address is None:
        return _is_local_name(host)
    return address.is_loopback or address.is_unspecified


def _local_addresses() -> set[Address]:
    import psutil

    found: set[Address] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            address = literal_address(entry.address.split("%")[0])
            if address is not None:
                found.add(address)
    return found


# -- the rules -----------------------------------------------------------------------------

def check_connection(host: str, port: int, addresses: list[Address], policy: LevelPolicy,
                     trust: Trust) -> None:
    """Raise ``blocked`` unless ``policy`` (of ``trust``) lets a plan connect to
    ``host:port``, which resolved to ``addresses``."""
    where = f"{host}:{port}"
    if trust == Trust.SUBMITTED:
        service = service_reached(host, port, addresses)
        if service:
            raise blocked(f"{where} is {service}: a submitted plan may never reach it")
    rules = policy.host_rules()
    if rules is not None and not any(r.matches(host, port, addresses) for r in rules):
        raise blocked(f"{where} is not in the '{trust}' policy's hosts "
                      f"({', '.join(policy.hosts or []) or 'none'})")
    if policy.allow_private:
        return
    for address in addresses:
        found = denied_range(address)
        if found:
            shown = host if literal_address(host) == address else f"{host} ({address})"
            raise blocked(f"{shown} is a {found} address: the '{trust}' policy denies "
                          f"{found} addresses")


def literal_problem(url: str, policy: LevelPolicy, trust: Trust) -> str | None:
    """What the rules say of ``url`` from its text alone (validation: nothing is resolved).
    A host name other than ``localhost`` is judged where the step executes."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    if not parsed.host:
        return None
    host = parsed.host.lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    address = literal_address(host)
    addresses = [address] if address else []
    if address is None and _is_local_name(host):
        addresses = [ipaddress.IPv4Address("127.0.0.1")]
    rules = policy.host_rules()
    if address is None and rules is not None and any(r.network for r in rules) and \
            not any(r.matches(host, port, []) for r in rules):
        rules = None  # the name may resolve into an allowed range: judged when it runs
    try:
        check_connection(host, port, addresses,
                         policy.model_copy(update={"hosts": None}) if rules is None
                         else policy, trust)
    except ConfigurationError as exc:
        return exc.message
    return None


def needs_guard(policy: LevelPolicy, trust: Trust) -> bool:
    """Whether connections under ``policy`` must be checked at all."""
    return trust == Trust.SUBMITTED or not policy.allow_private or policy.hosts is not None


async def check_url(url: str, policy: LevelPolicy, trust: Trust,
                    resolver: Resolver | None = None) -> list[Address]:
    """Resolve ``url``'s host and check it (for network tools other than
    ``http.request``); return the checked addresses to connect to."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(f"not a valid URL: {exc}") from None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = await _resolved(parsed.host, port, resolver or resolve)
    except OSError as exc:
        raise TransientError(f"cannot resolve {parsed.host}: {exc}") from exc
    if not addresses:
        raise TransientError(f"{parsed.host} resolves to no address")
    check_connection(parsed.host, port, addresses, policy, trust)
    return addresses


async def _resolved(host: str, port: int, resolver: Resolver) -> list[Address]:
    literal = literal_address(host)
    return [literal] if literal is not None else await resolver(host, port)


async def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to, in the resolver's order, without duplicates;
    OSError (``socket.gaierror``) when it does not resolve."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[Address] = []
    for info in infos:
        address = literal_address(str(info[4][0]).split("%")[0])
        if address is not None and address not in found:
            found.append(address)
    return found


# -- the httpx transport -------------------------------------------------------------------

class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, resolving and checking each host before it connects to
    a checked address."""

    def __init__(self, policy: LevelPolicy, trust: Trust, resolver: Resolver | None = None,
                 inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy, self.trust = policy, trust
        self._resolve = resolver or resolve
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await _resolved(host, port, self._resolve)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        check_connection(host, port, addresses, self.policy, self.trust)
        error: Exception | None = None
        for address in addresses:  # each one was checked; the name is not looked up again
            try:
                return await self._inner.connect_tcp(str(address), port, timeout=timeout,
                                                     local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise blocked("plans may not connect to Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's TLS context for every HTTP client of the tools (``verify=`` or a
    transport's). Made once: making one reads the CA bundle, ≈ 50 ms here, and a step made
    two (httpx's transport and its pool), ≈ 100 ms of every HTTP call."""
    return httpx.create_ssl_context()


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport whose every new connection goes through ``backend``."""

    def __init__(self, backend: GuardedBackend) -> None:
        super().__init__(verify=tls_context())
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                              keepalive_expiry=5.0)
        # httpx takes no network backend; its pool is replaced by one that has it.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls_context(), network_backend=backend,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry)


def guarded_transport(policy: LevelPolicy, trust: Trust,
                      resolver: Resolver | None = None) -> httpx.AsyncBaseTransport | None:
    """A transport enforcing ``policy``, or None when the level checks nothing (a local
    run with the defaults keeps httpx's own, proxies from the environment included)."""
    if not needs_guard(policy, trust):
        return None
    return GuardedTransport(GuardedBackend(policy, trust, resolver))
