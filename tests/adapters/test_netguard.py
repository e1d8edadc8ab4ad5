"""The network guard: its rules on addresses, and http.request through it against real
HTTP servers on 127.0.0.1 (names resolved by an injected resolver: no DNS here)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Callable, Iterator
from typing import Any

import httpcore
import pytest

from planrun.adapters.base import StepContext
from planrun.adapters.http import HttpRequest
from planrun.adapters.netguard import (
    Address,
    GuardedBackend,
    GuardedTransport,
    check_url,
    denied_range,
    guarded_transport,
    literal_problem,
)
from planrun.errors import ConfigurationError
from planrun.policy import LevelPolicy, Policy, Trust
from tests.security.local_server import LocalServer, local_server

SUBMITTED = Policy().submitted
LOCAL = Policy().local


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as running:
        yield running


def resolver(table: dict[str, list[str]], calls: list[str] | None = None
             ) -> Callable[[str, int], Any]:
    """A resolver answering from ``table`` (and counting its lookups in ``calls``)."""
    async def resolve(host: str, port: int) -> list[Address]:
        if calls is not None:
            calls.append(host)
        return [ipaddress.ip_address(a) for a in table[host]]
    return resolve


def fetch(url: str, policy: LevelPolicy, trust: Trust, make_ctx: Callable[..., StepContext],
          resolve: Any = None) -> dict[str, Any]:
    """http.request of ``url`` through the guard of ``policy``."""
    transport = GuardedTransport(GuardedBackend(policy, trust, resolve))
    ctx = make_ctx(trust=trust, policy=policy)
    return asyncio.run(HttpRequest(transport).run({"url": url}, ctx, timeout=10))


@pytest.mark.parametrize(("address", "rule"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("169.254.169.254", "link-local (cloud metadata)"),
    ("fe80::1", "link-local (cloud metadata)"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("100.64.0.1", "shared (CGNAT)"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("::ffff:10.0.0.1", "private"),
    ("2002:7f00:1::", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
])
def test_every_non_public_range_is_named(address: str, rule: str) -> None:
    assert denied_range(ipaddress.ip_address(address)) == rule


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert denied_range(ipaddress.ip_address(address)) is None


def test_a_submitted_request_to_a_real_loopback_server_is_refused_before_it_connects(
        server: LocalServer, make_ctx: Callable[..., StepContext]) -> None:
    with pytest.raises(ConfigurationError, match="blocked by policy: 127.0.0.1 is a loopback "
                       "address: the 'submitted' policy denies loopback addresses") as caught:
        fetch(server.url("/secret"), SUBMITTED, Trust.SUBMITTED, make_ctx)
    assert caught.value.category == "configuration"  # not retried
    assert server.hits == []


def test_http_request_uses_the_guard_of_its_context_without_being_given_one(
        server: LocalServer, make_ctx: Callable[..., StepContext]) -> None:
    ctx = make_ctx(trust=Trust.SUBMITTED, policy=SUBMITTED)
    with pytest.raises(ConfigurationError, match="blocked by policy"):
        asyncio.run(HttpRequest().run({"url": server.url()}, ctx, timeout=10))
    assert server.hits == []


def test_a_name_that_resolves_to_loopback_is_refused(
        server: LocalServer, make_ctx: Callable[..., StepContext]) -> None:
    table = {"innocent.example": ["127.0.0.1"]}
    with pytest.raises(ConfigurationError, match=r"innocent.example \(127.0.0.1\) is a "
                                                 "loopback address"):
        fetch(f"http://innocent.example:{server.port}/", SUBMITTED, Trust.SUBMITTED,
              make_ctx, resolver(table))
    assert server.hits == []


def test_a_name_with_one_bad_address_among_good_ones_is_refused(
        make_ctx: Callable[..., StepContext]) -> None:
    table = {"mixed.example": ["93.184.215.14", "169.254.169.254"]}
    with pytest.raises(ConfigurationError, match="link-local"):
        fetch("http://mixed.example/", SUBMITTED, Trust.SUBMITTED, make_ctx, resolver(table))


def test_the_connection_goes_to_the_checked_address_and_the_name_is_resolved_once(
        server: LocalServer, make_ctx: Callable[..., StepContext]) -> None:
    calls: list[str] = []
    policy = LevelPolicy(allow_private=True, hosts=[f"granted.example:{server.port}"])
    answer = fetch(f"http://granted.example:{server.port}/x", policy, Trust.SUBMITTED,
                   make_ctx, resolver({"granted.example": ["127.0.0.1"]}, calls))
    assert answer["status"] == 200
    assert answer["json"]["host"] == f"granted.example:{server.port}"  # Host keeps the name
    assert calls == ["granted.example"]  # no second lookup a rebinding DNS could answer


def test_a_redirect_to_a_port_that_is_not_granted_is_refused(
        server: LocalServer, make_ctx: Callable[..., StepContext]) -> None:
    with local_server() as other:
        policy = LevelPolicy(allow_private=True, hosts=[f"127.0.0.1:{server.port}"])
        url = server.url(f"/redirect?to={other.url('/inside')}")
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{other.port} is not in the "
                                                     "'submitted' policy's hosts"):
            fetch(url, policy, Trust.SUBMITTED, make_ctx)
        assert server.hits == [f"/redirect?to={other.url('/inside')}"]
        assert other.hits == []


class _Internet(httpcore.AnyIOBackend):
    """Stands in for the internet: whatever public address is asked for, it connects to
    ``server`` (and records the address it was asked for)."""

    def __init__(self, server: LocalServer) -> None:
        self.server, self.asked = server, []  # type: list[str]

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any
                          ) -> httpcore.AsyncNetworkStream:
        self.asked.append(f"{host}:{port}")
        return await super().connect_tcp("127.0.0.1", self.server.port, *args, **kwargs)


def test_a_public_url_that_redirects_to_loopback_is_refused_at_the_redirect(
        server: LocalServer, make_ctx: Callable[..., StepContext]) -> None:
    internet = _Internet(server)
    backend = GuardedBackend(SUBMITTED, Trust.SUBMITTED,
                             resolver({"public.example": ["93.184.215.14"]}), inner=internet)
    ctx = make_ctx(trust=Trust.SUBMITTED, policy=SUBMITTED)
    url = "http://public.example/redirect?to=http://127.0.0.1:4200/api/flow_runs/filter"
    with pytest.raises(ConfigurationError, match="127.0.0.1 is a loopback address"):
        asyncio.run(HttpRequest(GuardedTransport(backend)).run({"url": url}, ctx, timeout=10))
    assert internet.asked == ["93.184.215.14:80"]  # the checked address, not the name
    assert server.hits == ["/redirect?to=http://127.0.0.1:4200/api/flow_runs/filter"]


def test_the_prefect_api_is_refused_to_submitted_plans_even_where_private_is_allowed(
        make_ctx: Callable[..., StepContext]) -> None:
    api = os.environ["PREFECT_API_URL"]
    policy = LevelPolicy(allow_private=True)
    with pytest.raises(ConfigurationError, match="is the Prefect API: a submitted plan may "
                                                 "never reach it"):
        fetch(f"{api}/health", policy, Trust.SUBMITTED, make_ctx)
    assert fetch(f"{api}/health", policy, Trust.LOCAL, make_ctx)["status"] == 200


def test_the_bridge_is_refused_through_any_loopback_address(
        server: LocalServer, make_ctx: Callable[..., StepContext],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_BRIDGE_URL", f"http://0.0.0.0:{server.port}")
    policy = LevelPolicy(allow_private=True)
    for url in (server.url(), f"http://localhost:{server.port}/",
                f"http://127.0.0.2:{server.port}/"):
        with pytest.raises(ConfigurationError, match="is the planrun bridge"):
            fetch(url, policy, Trust.SUBMITTED, make_ctx,
                  resolver({"localhost": ["127.0.0.1"]}))
    assert server.hits == []


def test_hosts_accept_names_subdomains_ports_and_ranges() -> None:
    policy = LevelPolicy(hosts=["api.example.org", "*.cdn.example:443", "93.184.0.0/16"])

    async def allowed(url: str, *addresses: str) -> bool:
        try:
            await check_url(url, policy, Trust.SUBMITTED,
                            lambda host, port: _answer(list(addresses)))
        except ConfigurationError:
            return False
        return True

    async def scenario() -> list[bool]:
        return [await allowed("https://api.example.org/x", "1.1.1.1"),
                await allowed("https://img.cdn.example/x", "1.1.1.1"),
                await allowed("http://img.cdn.example/x", "1.1.1.1"),  # port 80
                await allowed("https://other.example/x", "93.184.1.7"),
                await allowed("https://other.example/x", "1.1.1.1")]

    assert asyncio.run(scenario()) == [True, True, False, True, False]


async def _answer(addresses: list[str]) -> list[Address]:
    return [ipaddress.ip_address(a) for a in addresses]


def test_check_url_refuses_cloud_metadata_behind_a_name() -> None:
    with pytest.raises(ConfigurationError, match="169.254.169.254"):
        asyncio.run(check_url("http://metadata.example/latest", SUBMITTED, Trust.SUBMITTED,
                              resolver({"metadata.example": ["169.254.169.254"]})))


@pytest.mark.parametrize(("url", "words"), [
    ("http://127.0.0.1:9/x", "127.0.0.1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]/x", "loopback"),
    ("http://169.254.169.254/latest", "link-local"),
    ("http://localhost:9/", "localhost (127.0.0.1) is a loopback address"),
    ("http://app.localhost/", "loopback"),
    ("http://10.0.0.8/", "private"),
])
def test_validation_judges_literal_hosts(url: str, words: str) -> None:
    assert words in (literal_problem(url, SUBMITTED, Trust.SUBMITTED) or "")
    assert literal_problem(url, LOCAL, Trust.LOCAL) is None


def test_validation_leaves_names_to_the_run_unless_hosts_decide() -> None:
    assert literal_problem("https://example.org/", SUBMITTED, Trust.SUBMITTED) is None
    named = LevelPolicy(hosts=["example.org"])
    assert literal_problem("https://example.org/", named, Trust.SUBMITTED) is None
    assert "not in the 'submitted' policy's hosts" in (
        literal_problem("https://evil.example/", named, Trust.SUBMITTED) or "")
    ranged = LevelPolicy(hosts=["93.184.0.0/16"])  # a name may resolve into the range
    assert literal_problem("https://evil.example/", ranged, Trust.SUBMITTED) is None


def test_a_local_run_with_the_defaults_keeps_httpx_own_transport() -> None:
    assert guarded_transport(LOCAL, Trust.LOCAL) is None
    assert isinstance(guarded_transport(SUBMITTED, Trust.SUBMITTED), GuardedTransport)
    assert isinstance(guarded_transport(LevelPolicy(allow_private=True, hosts=["a.example"]),
                                        Trust.LOCAL), GuardedTransport)


@pytest.mark.parametrize(("address", "rule"), [
    ("4000::1", "reserved"), ("2001:0:4136:e378:8000:63bf:3f57:fdf2", "private"),
])
def test_reserved_and_teredo_addresses_are_named(address: str, rule: str) -> None:
    assert denied_range(ipaddress.ip_address(address)) == rule


def test_the_real_resolver_answers_localhost_and_literals_without_duplicates() -> None:
    from planrun.adapters.netguard import resolve

    found = asyncio.run(resolve("localhost", 80))
    assert ipaddress.ip_address("127.0.0.1") in found and len(found) == len(set(found))
    assert asyncio.run(resolve("[::1]", 80)) == [ipaddress.ip_address("::1")]


def _unresolvable(host: str, port: int) -> Any:
    async def fail() -> list[Address]:
        raise OSError("Name or service not known")
    return fail()


def _nothing(host: str, port: int) -> Any:
    async def empty() -> list[Address]:
        return []
    return empty()


def test_check_url_says_what_is_wrong_with_a_url_it_cannot_use() -> None:
    from planrun.errors import TransientError

    with pytest.raises(ConfigurationError, match="not a valid URL"):
        asyncio.run(check_url("http://[::1", SUBMITTED, Trust.SUBMITTED))
    with pytest.raises(TransientError, match="cannot resolve nowhere.test: Name or service"):
        asyncio.run(check_url("http://nowhere.test/", SUBMITTED, Trust.SUBMITTED,
                              _unresolvable))
    with pytest.raises(TransientError, match="nowhere.test resolves to no address"):
        asyncio.run(check_url("http://nowhere.test/", SUBMITTED, Trust.SUBMITTED, _nothing))


def test_the_guarded_backend_turns_lookup_failures_into_connect_errors() -> None:
    async def never(host: str, port: int) -> list[Address]:
        await asyncio.Event().wait()
        return []

    def connect(resolve: Any, timeout: float | None = 5) -> Any:
        backend = GuardedBackend(SUBMITTED, Trust.SUBMITTED, resolve)
        return asyncio.run(backend.connect_tcp("nowhere.test", 80, timeout=timeout))

    with pytest.raises(httpcore.ConnectError, match="cannot resolve nowhere.test"):
        connect(_unresolvable)
    with pytest.raises(httpcore.ConnectError, match="nowhere.test resolves to no address"):
        connect(_nothing)
    with pytest.raises(httpcore.ConnectTimeout, match="resolving nowhere.test timed out"):
        connect(never, timeout=0.05)


def test_the_guarded_backend_refuses_unix_sockets() -> None:
    backend = GuardedBackend(LOCAL, Trust.LOCAL)
    with pytest.raises(ConfigurationError, match="plans may not connect to Unix sockets"):
        asyncio.run(backend.connect_unix_socket("/run/docker.sock"))


def test_validation_leaves_urls_without_a_usable_host_to_the_run() -> None:
    assert literal_problem("http://[::1", SUBMITTED, Trust.SUBMITTED) is None
    assert literal_problem("file:///etc/passwd", SUBMITTED, Trust.SUBMITTED) is None


def test_own_services_skip_a_malformed_url_and_ask_prefect_when_it_is_loaded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect  # noqa: F401 - loaded, so its settings are asked
    from prefect.settings import get_current_settings

    from planrun.adapters.netguard import own_services

    monkeypatch.setenv("PLANRUN_BRIDGE_URL", "http://[::1")
    api = os.environ.pop("PREFECT_API_URL")
    try:
        services = own_services()
    finally:
        os.environ["PREFECT_API_URL"] = api
    expected = get_current_settings().api.url
    assert [s[0] for s in services] == (["the Prefect API"] if expected else [])
