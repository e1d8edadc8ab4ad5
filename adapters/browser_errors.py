"""How ``browser.open``'s failures become planrun's errors (docs/errors.md), in one place:
a request the page guard blocked, a page that did not load in time or whose ``wait_for``
selector failed, Chromium's ``net::ERR_*`` of a page that did not open, an HTTP status the
page was answered with, the browser's memory limit, and a browser that closed or would not
start. Each message names the URL without its secrets (``redact_url``).
"""

from __future__ import annotations

from planrun.adapters.chromium import CHROMIUM_ENV
from planrun.adapters.pageguard import RequestGuard
from planrun.errors import (
    AccessError,
    ConfigurationError,
    LogicError,
    ResourceError,
    StepError,
    TransientError,
)
from planrun.redact import redact_url

MIB = 1024 * 1024


def raise_blocked(guard: RequestGuard | None) -> None:
    """Raise the configuration error of the first request the guard blocked, if any."""
    if guard is not None and guard.blocked:
        first = guard.blocked[0]
        more = f" ({len(guard.blocked) - 1} more request(s) blocked)" \
            if len(guard.blocked) > 1 else ""
        raise ConfigurationError(f"browser.open: a request of the page was {first.message}"
                                 f"{more}", hint=first.hint)


def load_timeout(url: str, timeout_s: float) -> TransientError:
    """The error of a page that did not load within the step's ``load_timeout``."""
    return TransientError(
        f"browser.open: {redact_url(url)} did not load within {timeout_s:g}s",
        hint="the site is slow or unreachable; it was retried - raise the step's "
             "load_timeout if the page needs longer")


def selector_missing(selector: str, url: str, wait_s: float) -> LogicError:
    """The error of a ``wait_for`` selector that did not appear within ``wait_timeout``."""
    return LogicError(
        f"browser.open: the selector {selector!r} did not appear on "
        f"{redact_url(url)} within {wait_s:g}s",
        hint="check the selector against the page (it may be named differently, "
             "or shown only after a login), or raise wait_timeout")


def invalid_selector(selector: str, exc: Exception) -> ConfigurationError | None:
    """The error of a ``wait_for`` that Playwright refused as a selector; None for
    another failure of the wait."""
    if "selector" not in str(exc).lower() or "closed" in str(exc).lower():
        return None
    return ConfigurationError(
        f"browser.open: {selector!r} is not a valid selector: {str(exc).splitlines()[0]}",
        hint="write a CSS selector, like '#main' or 'article h1'")


def navigation_error(url: str, exc: Exception, guard: RequestGuard | None) -> StepError:
    """The error of a page that could not be opened, from Chromium's ``net::ERR_*``."""
    text = str(exc)
    shown = redact_url(url)
    failed = f" ({guard.failed[0]})" if guard is not None and guard.failed else ""
    if "ERR_NAME_NOT_RESOLVED" in text:
        return TransientError(f"browser.open: cannot resolve the host of {shown}{failed}",
                              hint="check the host name in the URL; it was retried in case "
                                   "the resolver failed for a moment")
    if "ERR_CONNECTION_REFUSED" in text:
        return TransientError(f"browser.open: the connection to {shown} was refused{failed}",
                              hint="check the port in the URL and that the site is up")
    if "ERR_" in text and "net::" in text:
        code = text.split("net::", 1)[1].split()[0]
        return TransientError(f"browser.open: could not open {shown}: {code}{failed}",
                              hint="a network or server problem; it was retried - try the "
                                   "page in a browser if it persists")
    if browser_closed(text):
        return TransientError(
            f"browser.open: the browser closed while opening {shown}: "
            f"{text.splitlines()[0]}",
            hint="the browser crashed or was stopped; it is started again for the retry")
    if "invalid url" in text.lower():
        return ConfigurationError(f"browser.open: invalid URL {shown}",
                                  hint="use an http:// or https:// URL with a host name")
    return TransientError(f"browser.open: could not open {shown}: {text.splitlines()[0]}",
                          hint="an unexpected browser error; it was retried")


def browser_closed(text: str) -> bool:
    """Whether Playwright's message says the browser (or its page) closed or crashed."""
    lowered = text.lower()
    return "has been closed" in lowered or "target crashed" in lowered or \
        "browser closed" in lowered or "connection closed" in lowered


def over_memory(limit_mb: int, growth: int) -> ResourceError:
    """The error of a step stopped when the browser grew past its memory limit."""
    return ResourceError(
        f"browser.open: stopped at its memory limit of {limit_mb} MiB: the browser's "
        f"processes grew by {growth // MIB} MiB while the step ran",
        hint="raise the step's memory_mb (or the plan's limits.memory_mb), or open a lighter "
             "page; the growth is the whole browser's, other steps' pages included "
             "(docs/browser.md, \"Resources\")")


def status_error(url: str, status: int) -> StepError:
    """The error of a page answered with HTTP 4xx or 5xx, by the status."""
    said = f"browser.open: {redact_url(url)} answered HTTP {status}"
    details = {"status": status, "url": redact_url(url)}
    hint = "set allow_error_status: true to take the page as it is"
    if status == 429:
        return ResourceError(f"{said}: too many requests", details=details,
                             hint=f"the site is rate limiting; {hint}")
    if status == 408 or status >= 500:
        return TransientError(f"{said}: a server-side failure", details=details,
                              hint=f"the site failed; it was retried - {hint}")
    if status in (401, 403):
        return AccessError(f"{said}: access refused", details=details,
                           hint=f"the page needs credentials; {hint}")
    return ConfigurationError(f"{said}: check the URL", details=details,
                              hint=f"the site refused the request; {hint}")


def browser_error(exc: Exception) -> StepError | None:
    """The error of a browser that closed or could not start; None for any other."""
    text = str(exc)
    if browser_closed(text):
        return TransientError(f"browser.open: the browser closed: {text.splitlines()[0]}",
                              hint="the browser crashed or was stopped; it is started "
                                   "again for the retry")
    if "Executable doesn't exist" in text or isinstance(exc, FileNotFoundError):
        return ConfigurationError(
            f"browser.open: cannot start Chromium: {text.splitlines()[0]}",
            hint="install Debian's chromium package (scripts/install does), or set "
                 f"{CHROMIUM_ENV} to a Chromium binary")
    return None
