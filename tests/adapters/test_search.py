"""search.web against a real HTTP server on 127.0.0.1 speaking SearXNG's and Brave's APIs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from planrun.adapters.base import StepContext
from planrun.adapters.search import SearchWeb, clean_text, safe_url, url_identity
from planrun.adapters.search_cache import SearchCache, normalised_query
from planrun.errors import AccessError, ConfigurationError, ResourceError, TransientError
from planrun.policy import LevelPolicy, Trust, trusted_as
from tests.agent_servers import BRAVE_KEY, BRAVE_PATH, SearchHandler, brave_error, serving


@pytest.fixture
def server() -> Iterator[Any]:
    with serving(SearchHandler) as running:
        yield running


@pytest.fixture
def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``configure(provider, url, **fields)`` writes the operator's tools.yaml."""
    for name in ("PLANRUN_SEARCH_PROVIDER", "PLANRUN_SEARCH_URL", "PLANRUN_SEARCH_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PLANRUN_SECRET_BRAVE_KEY", BRAVE_KEY)

    def write(provider: str, url: str, **fields: Any) -> None:
        file = tmp_path / "tools.yaml"
        file.write_text(json.dumps({"search": {"provider": provider, "url": url, **fields}}))
        monkeypatch.setenv("PLANRUN_TOOLS", str(file))
    return write


@pytest.fixture
def tool(tmp_path: Path) -> SearchWeb:
    return SearchWeb(cache=SearchCache(tmp_path / "cache.sqlite3"))


@pytest.fixture
def ctx(make_ctx: Any) -> StepContext:
    return make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True,
                                                           hosts=["127.0.0.1"]))


def search(tool: SearchWeb, ctx: StepContext, **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(tool.run(params, ctx, 10))
    return result


def test_searxng_results_are_normalised_sanitised_and_merged(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext) -> None:
    configure("searxng", server.url)
    out = search(tool, ctx, query="prefect pricing", max_results=10)
    assert server.requests[0]["query"] == {"q": "prefect pricing", "format": "json"}
    assert out["provider"] == "searxng" and out["cached"] is False
    assert [r["url"] for r in out["results"]] == [
        "https://www.prefect.io/pricing", "https://docs.prefect.io/v3/concepts/flows"]
    first, second = out["results"]
    assert first["title"] == "Pricing | Prefect"
    assert first["snippet"] == "Plans for every team. Start free & scale."
    assert first["source"] == "duckduckgo, bing"  # the duplicate's engine merged in
    assert first["published"] == "2024-05-01T00:00:00"  # filled from the duplicate
    assert second["snippet"] == "Flows are the most central Prefect object."
    assert "<" not in json.dumps(out["results"]) and "alert" not in json.dumps(out)


def test_brave_results_use_its_fields_and_send_the_key(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext) -> None:
    configure("brave", server.url + BRAVE_PATH, api_key_secret="BRAVE_KEY")
    out = search(tool, ctx, query="prefect pricing", max_results=5)
    assert server.requests[0]["token"] == BRAVE_KEY
    assert server.requests[0]["query"] == {"q": "prefect pricing", "count": "5"}
    assert out["results"] == [
        {"title": "Pricing | Prefect", "url": "https://www.prefect.io/pricing",
         "snippet": "Compare Prefect plans. Free tier included.", "source": "Prefect",
         "published": "2024-04-20T12:00:00"},
        {"title": "Prefect Cloud pricing explained",
         "url": "https://example.com/blog/prefect-cloud",
         "snippet": "A look at Prefect Cloud & its tiers.", "source": "Example Blog",
         "published": "2 days ago"}]


def test_a_bad_brave_key_is_a_permission_error_without_the_key(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext,
        monkeypatch: pytest.MonkeyPatch) -> None:
    configure("brave", server.url + BRAVE_PATH, api_key_secret="BRAVE_KEY")
    monkeypatch.setenv("PLANRUN_SECRET_BRAVE_KEY", "wrong-key-value")
    with pytest.raises(AccessError) as caught:
        search(tool, ctx, query="x")
    assert "401" in caught.value.message and "wrong-key-value" not in repr(
        (caught.value.message, caught.value.hint, caught.value.details))


def test_429_is_a_resource_error_with_the_servers_retry_after(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext) -> None:
    configure("brave", server.url + BRAVE_PATH, api_key_secret="BRAVE_KEY")
    server.behaviour.fail.append((429, {"Retry-After": "7", "X-RateLimit-Limit": "1, 15000"},
                                  brave_error(429, "RATE_LIMITED", "Request rate limit "
                                                                   "exceeded for plan.")))
    with pytest.raises(ResourceError) as caught:
        search(tool, ctx, query="x")
    assert caught.value.retry_after == 7.0


def test_a_slow_provider_is_a_transient_timeout(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext) -> None:
    configure("searxng", server.url, timeout_s=0.3)
    server.behaviour.slow = True
    with pytest.raises(TransientError, match="did not answer in time"):
        search(tool, ctx, query="x")


def test_a_server_failure_is_transient_and_a_searxng_without_json_is_permission(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext) -> None:
    configure("searxng", server.url)
    server.behaviour.fail.append((502, {}, b"bad gateway"))
    with pytest.raises(TransientError, match="502"):
        search(tool, ctx, query="x")
    server.behaviour.fail.append((403, {}, b"Forbidden"))
    with pytest.raises(AccessError) as caught:
        search(tool, ctx, query="x")
    assert "json format" in (caught.value.hint or "")


def test_the_cache_answers_the_same_normalised_query_without_a_request(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext) -> None:
    configure("searxng", server.url)
    first = search(tool, ctx, query="Prefect  pricing", max_results=2)
    again = search(tool, ctx, query="  prefect PRICING ", max_results=1)
    assert len(server.requests) == 1
    assert first["cached"] is False and again["cached"] is True
    assert again["results"] == first["results"][:1]
    search(tool, ctx, query="prefect flows", max_results=2)  # another query: a miss
    assert len(server.requests) == 2


def test_the_cache_expires_and_is_per_provider(
        server: Any, configure: Any, tool: SearchWeb, ctx: StepContext) -> None:
    configure("searxng", server.url, cache_ttl_s=0)
    search(tool, ctx, query="q")
    search(tool, ctx, query="q")
    assert len(server.requests) == 2  # a TTL of 0 never reuses
    configure("searxng", server.url)
    search(tool, ctx, query="q")
    configure("brave", server.url + BRAVE_PATH, api_key_secret="BRAVE_KEY")
    out = search(tool, ctx, query="q")
    assert out["provider"] == "brave" and out["cached"] is False
    assert len(server.requests) == 4


def test_a_submitted_plan_cannot_reach_a_loopback_endpoint_unless_the_operator_allows_it(
        server: Any, configure: Any, tool: SearchWeb, make_ctx: Any) -> None:
    ctx = make_ctx(trust=Trust.SUBMITTED, policy=LevelPolicy())
    configure("searxng", server.url)
    with pytest.raises(ConfigurationError, match="blocked by policy: 127.0.0.1 is a loopback"):
        search(tool, ctx, query="x")
    assert server.requests == []
    configure("searxng", server.url, allow_private=True)
    assert search(tool, ctx, query="x")["count"] == 2


def test_without_a_provider_the_step_fails_as_configuration_and_health_says_why(
        tool: SearchWeb, ctx: StepContext, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLANRUN_SEARCH_PROVIDER", raising=False)
    monkeypatch.setenv("PLANRUN_TOOLS", str(tmp_path / "empty.yaml"))
    (tmp_path / "empty.yaml").write_text("{}")
    with pytest.raises(ConfigurationError, match="no search provider is configured"):
        search(tool, ctx, query="x")
    health = asyncio.run(tool.health())
    assert not health.ok and "no search provider" in health.detail


def test_health_is_whether_the_endpoint_answers(
        server: Any, configure: Any, tool: SearchWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    configure("searxng", server.url)
    with trusted_as(Trust.LOCAL):
        assert asyncio.run(tool.health()).ok
        configure("searxng", "http://127.0.0.1:9")  # discard: nothing listens
        health = asyncio.run(tool.health())
    assert not health.ok and "does not answer" in health.detail


def test_a_malformed_configuration_lists_its_problems(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: SearchWeb,
        ctx: StepContext) -> None:
    file = tmp_path / "tools.yaml"
    file.write_text("search: {provider: bing, url: ftp://x}\n")
    monkeypatch.setenv("PLANRUN_TOOLS", str(file))
    with pytest.raises(ConfigurationError) as caught:
        search(tool, ctx, query="x")
    assert "search.provider" in caught.value.message and "search.url" in caught.value.message


def test_the_provider_host_is_what_per_host_limits_count(
        configure: Any, tool: SearchWeb) -> None:
    configure("brave", "https://api.search.brave.com/res/v1/web/search",
              api_key_secret="BRAVE_KEY")
    assert tool.call_host({"query": "x"}) == "api.search.brave.com"


def test_text_and_urls_are_cleaned() -> None:
    assert clean_text("<p onclick=x>a &lt;b&gt;</p><script>evil()</script>", 50) == "a <b>"
    assert clean_text("x" * 20, 10) == "x" * 9 + "…"
    assert safe_url("javascript:alert(1)") is None
    assert safe_url("//example.org/x") is None
    assert safe_url("https://example.org/a b") is None
    assert safe_url("http://example.org/x") == "http://example.org/x"
    assert url_identity("HTTPS://Example.org:443/a/#f") == url_identity("https://example.org/a")
    assert normalised_query("  Ünï  CODE ") == normalised_query("ünï code")


def test_the_operators_host_limit_of_the_provider_applies_to_every_search(
        configure: Any) -> None:
    from planrun.flows.limits import Ask, limit_keys
    from planrun.policy_limits import OperatorLimits

    configure("searxng", "http://Search.Internal:8888")
    limits = OperatorLimits.model_validate({"hosts": {"search.internal": {"rate": 2}}})
    _, rates = limit_keys(Ask.of("search.web", {"query": "x"}, "r", "s", {}), limits)
    assert rates["host:search.internal"].per_s == 2


def test_the_environment_alone_can_configure_the_provider(
        server: Any, tool: SearchWeb, ctx: StepContext, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLANRUN_TOOLS", raising=False)
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path / "home"))  # no tools.yaml there
    monkeypatch.setenv("PLANRUN_SEARCH_PROVIDER", "searxng")
    monkeypatch.setenv("PLANRUN_SEARCH_URL", server.url)
    assert search(tool, ctx, query="x")["provider"] == "searxng"
    assert server.requests[0]["path"] == "/search"


def test_after_a_resource_error_the_retry_asks_for_half_the_results(
        server: Any, configure: Any, tool: SearchWeb, make_ctx: Any) -> None:
    configure("brave", server.url + BRAVE_PATH, api_key_secret="BRAVE_KEY")
    ctx = make_ctx(trust=Trust.LOCAL, policy=LevelPolicy(allow_private=True), attempt=2,
                   previous_error=ResourceError("429"))
    out = search(tool, ctx, query="less please", max_results=8)
    assert server.requests[0]["query"]["count"] == "4" and out["count"] == 2
