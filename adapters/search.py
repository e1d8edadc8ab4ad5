"""The ``search.web`` tool: a web search through the provider the operator configured
(docs/agent-tools.md), a SearXNG instance's JSON API or the Brave Search API.

The plan gives only ``query`` and ``max_results``; the endpoint, its key and its cache TTL
are the operator's (``adapters.tool_config``). Every result is normalised to ``title``,
``url``, ``snippet``, ``source``, ``published``: markup is removed from text with nh3
(scripts and styles with their content), URLs other than http(s) are dropped, and results
whose normalised URLs are equal are merged. Result lists are cached per provider, endpoint
and normalised query (``adapters.search_cache``). Errors: a timeout or a connection
failure is ``transient``, 429 ``resource`` (Retry-After honoured), 401/403 ``permission``,
5xx ``transient``, other 4xx ``configuration``; the connection goes through the network
guard of the step's policy like ``http.request``'s.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import httpx
import nh3
from pydantic import Field

from planrun.adapters.base import Adapter, Health, Params, StepContext
from planrun.adapters.http import parse_retry_after
from planrun.adapters.netguard import guarded_transport, tls_context
from planrun.adapters.search_cache import SearchCache, cache_key
from planrun.adapters.tool_config import (
    DOC,
    SearchConfig,
    load_tools_config,
    operator_secret,
)
from planrun.errors import (
    AccessError,
    ConfigurationError,
    ResourceError,
    StepError,
    TransientError,
)
from planrun.policy import LevelPolicy, Trust, current_trust, load_policy
from planrun.redact import Redactor

SNIPPET_CHARS = 1000
TITLE_CHARS = 300


class SearchParams(Params):
    query: str = Field(min_length=1, max_length=400, description="What to search for.")
    max_results: int = Field(default=10, ge=1, le=50,
                             description="At most this many results (after merging).")


class SearchWeb(Adapter[SearchParams]):
    """Searches: ``{"provider", "query", "results": [{title, url, snippet, source,
    published}], "cached"}``. ``transport`` lets tests inject an httpx fake; ``cache`` a
    cache file of their own."""

    name = "search.web"
    Params = SearchParams
    summary = "search the web (SearXNG or Brave Search)"
    default_estimate_s = 1.5
    default_timeout_s = 60.0

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None,
                 cache: SearchCache | None = None) -> None:
        self._transport = transport
        self._cache = cache

    def call_host(self, params: Mapping[str, Any]) -> str | None:
        """The provider's host: the operator's ``limits.hosts`` entry for it limits every
        search (docs/limits.md)."""
        try:
            search = load_tools_config().search
            return httpx.URL(search.endpoint()).host if search else None
        except (ConfigurationError, ValueError, httpx.InvalidURL):
            return None

    async def execute(self, params: SearchParams, ctx: StepContext) -> dict[str, Any]:
        search = _configured()
        wanted = max(1, params.max_results // 2) if ctx.reduce_usage else params.max_results
        endpoint = search.endpoint()
        cache = self._cache or SearchCache()
        key = cache_key(search.provider, endpoint, params.query)
        hit = cache.get(key, wanted, search.cache_ttl_s)
        if hit is not None:
            return _output(search, params, hit, cached=True)
        key_value = await _api_key(search)
        response = await self._get(search, ctx.policy, ctx.trust, params.query, wanted,
                                   key_value)
        results = _merged(_parse(search.provider, response))[:wanted]
        if search.cache_ttl_s > 0:
            cache.put(key, wanted, results)
        return _output(search, params, results, cached=False)

    async def _get(self, search: SearchConfig, policy: LevelPolicy, trust: Trust, query: str,
                   count: int, key: str | None) -> httpx.Response:
        request = _request(search, query, count, key)
        transport = self._transport or guarded_transport(_endpoint_policy(search, policy),
                                                         trust)
        try:
            async with httpx.AsyncClient(transport=transport, verify=tls_context(),
                                         timeout=search.timeout_s,
                                         follow_redirects=False) as client:
                response = await client.send(client.build_request(**request))
        except Exception as exc:  # noqa: BLE001 - the edge: translated, the key scrubbed
            raise Redactor([key] if key else []).scrub_error(self.classify(exc)) from exc
        if response.status_code >= 300:
            raise _status_error(search, response)
        return response

    def classify(self, exc: Exception) -> StepError:
        if isinstance(exc, StepError):  # the network guard's refusal
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return TransientError(
                f"search.web: the provider did not answer in time ({type(exc).__name__})",
                hint="the search service is slow or unreachable; it was retried")
        if isinstance(exc, httpx.TransportError):
            return TransientError(
                f"search.web: cannot reach the provider: {type(exc).__name__}: {exc}",
                hint="check that the search service is up (planrun tools shows its health)")
        return super().classify(exc)

    async def health(self) -> Health:
        """Healthy when a provider is configured, its key is set and its endpoint answers
        an HTTP request at all (any status below 500)."""
        try:
            search = _configured()
            if search.provider == "brave":
                await _api_key(search)
            policy = _endpoint_policy(search, load_policy().level(current_trust()))
            transport = self._transport or guarded_transport(policy, current_trust())
            async with httpx.AsyncClient(transport=transport, verify=tls_context(),
                                         timeout=5.0) as client:
                response = await client.head(search.endpoint())
        except StepError as exc:
            return Health(ok=False, detail=exc.message)
        except httpx.HTTPError as exc:
            return Health(ok=False, detail=f"the search endpoint does not answer: "
                                           f"{type(exc).__name__}: {exc}")
        if response.status_code >= 500:
            return Health(ok=False, detail=f"the search endpoint answers "
                                           f"{response.status_code}")
        return Health(ok=True, detail=f"{search.provider} at {search.endpoint()}")


def _configured() -> SearchConfig:
    search = load_tools_config().search
    if search is None:
        raise ConfigurationError(
            "search.web: no search provider is configured",
            hint=f"the operator sets search: in tools.yaml or PLANRUN_SEARCH_PROVIDER "
                 f"and PLANRUN_SEARCH_URL ({DOC})")
    return search


async def _api_key(search: SearchConfig) -> str | None:
    if search.provider != "brave":
        return None
    if search.api_key_secret is None:
        raise ConfigurationError("search.web: Brave Search needs api_key_secret",
                                 hint=f"the operator names the key's secret ({DOC})")
    return await operator_secret(search.api_key_secret, "search.web (Brave Search)")


def _endpoint_policy(search: SearchConfig, policy: LevelPolicy) -> LevelPolicy:
    """The step's policy, with private addresses allowed when the operator said this
    endpoint may be on one: the plan cannot choose the endpoint, the operator did."""
    if search.allow_private and not policy.allow_private:
        return policy.model_copy(update={"allow_private": True})
    return policy


# -- the providers' APIs ---------------------------------------------------------------------

def _request(search: SearchConfig, query: str, count: int, key: str | None) -> dict[str, Any]:
    if search.provider == "brave":
        params: dict[str, Any] = {"q": query, "count": min(count, 20)}
        if search.country:
            params["country"] = search.country
        if search.safesearch is not None:
            params["safesearch"] = ["off", "moderate", "strict"][search.safesearch]
        return {"method": "GET", "url": search.endpoint(), "params": params,
                "headers": {"Accept": "application/json", "X-Subscription-Token": key or ""}}
    params = {"q": query, "format": "json"}
    if search.language:
        params["language"] = search.language
    if search.safesearch is not None:
        params["safesearch"] = search.safesearch
    return {"method": "GET", "url": search.endpoint(), "params": params,
            "headers": {"Accept": "application/json"}}


def _parse(provider: str, response: httpx.Response) -> list[dict[str, Any]]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise TransientError(
            f"search.web: {provider} answered something that is not its JSON API "
            f"({response.headers.get('content-type', 'no content type')})",
            hint="check the configured endpoint; a SearXNG instance must enable the json "
                 "format (search.formats in its settings.yml)")
    if provider == "brave":
        raw = (data.get("web") or {}).get("results") or []
        return [r for r in map(_from_brave, raw) if r is not None]
    return [r for r in map(_from_searxng, data.get("results") or []) if r is not None]


def _from_searxng(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    return _result(item.get("title"), item.get("url"), item.get("content"),
                   item.get("engine") or ", ".join(item.get("engines") or []),
                   item.get("publishedDate"))


def _from_brave(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    profile = item.get("profile") or {}
    meta = item.get("meta_url") or {}
    return _result(item.get("title"), item.get("url"), item.get("description"),
                   profile.get("name") or meta.get("hostname"),
                   item.get("page_age") or item.get("age"))


def _result(title: Any, url: Any, snippet: Any, source: Any,
            published: Any) -> dict[str, Any] | None:
    checked = safe_url(url)
    if checked is None:
        return None
    return {"title": clean_text(title, TITLE_CHARS) or checked, "url": checked,
            "snippet": clean_text(snippet, SNIPPET_CHARS),
            "source": clean_text(source, TITLE_CHARS) or None,
            "published": clean_text(published, 64) or None}


def clean_text(value: Any, limit: int) -> str:
    """``value`` as plain text: tags removed (scripts and styles with their content),
    entities decoded, whitespace collapsed, at most ``limit`` characters."""
    if not isinstance(value, str):
        return ""
    stripped = nh3.clean(value, tags=set(), clean_content_tags={"script", "style"})
    text = " ".join(html.unescape(stripped).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def safe_url(value: Any) -> str | None:
    """``value`` if it is an http(s) URL with a host, else None (``javascript:``,
    ``data:``, relative links and garbage are dropped)."""
    if not isinstance(value, str) or any(c.isspace() or ord(c) < 32 for c in value.strip()):
        return None
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, TypeError):
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return str(url)


def url_identity(url: str) -> str:
    """What two URLs of the same page share: scheme and host in lower case, no default
    port, no fragment, no trailing slash."""
    parsed = httpx.URL(url)
    port = "" if parsed.port in (None, 80, 443) else f":{parsed.port}"
    path = parsed.path.rstrip("/") or "/"
    query = f"?{parsed.query.decode()}" if parsed.query else ""
    return f"{parsed.scheme}://{parsed.host.lower()}{port}{path}{query}"


def _merged(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results in their order, each page once: a later duplicate fills what the first
    lacks and adds its source."""
    kept: dict[str, dict[str, Any]] = {}
    for result in results:
        same = kept.setdefault(url_identity(result["url"]), dict(result))
        if same is result or same == result:
            continue
        for field in ("snippet", "published"):
            if not same.get(field) and result.get(field):
                same[field] = result[field]
        sources = [s for s in (same.get("source") or "").split(", ") if s]
        if result.get("source") and result["source"] not in sources:
            same["source"] = ", ".join([*sources, result["source"]])
    return list(kept.values())


def _output(search: SearchConfig, params: SearchParams, results: list[dict[str, Any]],
            cached: bool) -> dict[str, Any]:
    return {"provider": search.provider, "query": params.query, "count": len(results),
            "results": results, "cached": cached}


def _status_error(search: SearchConfig, response: httpx.Response) -> StepError:
    status = response.status_code
    said = f"search.web: {search.provider} answered {status} {response.reason_phrase}"
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        wait = f" (it asked to wait {retry_after:g}s)" if retry_after is not None else ""
        return ResourceError(f"{said}: too many requests{wait}", retry_after=retry_after,
                             hint="the provider's rate limit or quota is reached; the retry "
                                  "waits as asked - lower limits.tools.search.web.rate")
    if status in (401, 403):
        return AccessError(f"{said}: the provider refused the credentials",
                           hint=f"the operator must check the API key (or, for SearXNG, that "
                                f"the json format is enabled) ({DOC})")
    if status == 408 or status >= 500:
        return TransientError(f"{said}: a server-side failure", retry_after=retry_after,
                              hint="the search service failed; it was retried")
    return ConfigurationError(f"{said}: the request was refused",
                              hint=f"check the query and the operator's search settings ({DOC})")
