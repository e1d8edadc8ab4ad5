"""Redaction: what planrun shows of a value that may hold a secret. The one place for it.

Two kinds, both here:

- **by name**: the values of keys that look like credentials (``authorization``,
  ``cookie``, ``token``, ``secret``, ``password``, ``api_key``...), credential headers, and
  a URL's password and token-like query parameters (:func:`redact`, :func:`redact_headers`,
  :func:`redact_url`);
- **by value**: every value registered with a run's :class:`Redactor` (its secret inputs
  and ``{{ secrets.NAME }}``, docs/secrets.md) is replaced by ``***`` wherever it appears
  inside a string, a key, a number or an error, and in every log record of the process
  (:func:`watch_logs`).

A value shorter than ``MIN_INSIDE`` characters is masked only where it is a whole string:
masking it inside longer text would hide every ``a`` of the output and reveal the secret
by its holes.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

import httpx

from planrun.errors import StepError

MASK = "***"
#: In URLs: ``*`` is percent-encoded in a query string, a word is not.
URL_MASK = "redacted"
MIN_INSIDE = 4

SECRET_KEY = re.compile(r"authorization|cookie|token|secret|password|passwd|api[_-]?key",
                        re.IGNORECASE)
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie",
                            "x-api-key"})
SECRET_QUERY = re.compile(r"token|key|secret|password|passwd|signature|sig|auth", re.I)


# -- by name -----------------------------------------------------------------------------

def redact(value: Any) -> Any:
    """``value`` with the values of secret-looking keys replaced by ``***`` and the
    secrets inside URLs (passwords, token-like query parameters) replaced too."""
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and SECRET_KEY.search(k) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return redact_url(value)
    return value


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with the values of credential headers replaced."""
    return {k: MASK if k.lower() in SECRET_HEADERS else v for k, v in headers.items()}


def redact_url(url: str) -> str:
    """``url`` without its password and the values of token-like query parameters."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return url
    if parsed.password:
        parsed = parsed.copy_with(userinfo=f"{parsed.username}:{URL_MASK}".encode())
    if any(SECRET_QUERY.search(k) for k in parsed.params):
        parsed = parsed.copy_with(params=[(k, URL_MASK if SECRET_QUERY.search(k) else v)
                                          for k, v in parsed.params.multi_items()])
    return str(parsed)


def request_credentials(url: str, headers: Mapping[str, str],
                        query: Mapping[str, Any]) -> list[str]:
    """The credentials a request carries (credential headers, and a bearer token alone;
    the URL's password; token-like query parameters), to be cut out of its errors."""
    values = [v for k, v in headers.items() if k.lower() in SECRET_HEADERS]
    values += [part for v in list(values) for part in v.split()]  # "Bearer <token>"
    try:
        parsed = httpx.URL(url)
        values += [parsed.password or ""]
        values += [str(v) for k, v in parsed.params.multi_items() if SECRET_QUERY.search(k)]
    except httpx.InvalidURL:
        pass
    values += [str(v) for k, v in query.items() if SECRET_QUERY.search(k)]
    return [v for v in values if len(v) >= MIN_INSIDE]


# -- by value ----------------------------------------------------------------------------

def _forms(text: str) -> set[str]:
    """``text`` as it may show: itself, escaped in a repr or JSON, percent-encoded."""
    return {text, repr(text)[1:-1], json.dumps(text)[1:-1], quote(text, safe=""),
            quote_plus(text, safe="")}


def _leaves(value: Any) -> Iterable[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        yield value if isinstance(value, str) else str(value)


class Redactor:
    """The secret values of one run, and :meth:`mask` that hides them.

    Registering is rare (at a run's start) and masking frequent, from any thread: the
    pattern is rebuilt on :meth:`add` and swapped in whole.
    """

    def __init__(self, values: Iterable[Any] = ()) -> None:
        self._lock = threading.Lock()
        self._inside: frozenset[str] = frozenset()
        self._whole: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add(*values)

    def __bool__(self) -> bool:
        return bool(self._whole)

    def add(self, *values: Any) -> None:
        """Register secret values: strings, numbers, and the leaves of lists and mappings."""
        texts = {form for value in values for leaf in _leaves(value) if leaf
                 for form in _forms(leaf)}
        if not texts - self._whole:
            return
        with self._lock:
            self._whole = self._whole | texts
            self._inside = self._inside | {t for t in texts if len(t) >= MIN_INSIDE}
            ordered = sorted(self._inside, key=len, reverse=True)  # longest first
            self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def mask(self, value: Any) -> Any:
        """``value`` (JSON-like data) with every registered secret replaced by ``***``;
        other types are returned as they are."""
        if not self._whole:
            return value
        return self._mask(value, self._pattern, self._whole)

    def text(self, text: str) -> str:
        """``text`` with every registered secret replaced by ``***``."""
        masked: str = self.mask(text)
        return masked

    def scrub_error(self, error: StepError) -> StepError:
        """``error`` itself, its message, hint and details masked (in place: the same
        error goes on to Prefect's task-run state and to the report)."""
        if self._whole:
            error.message = self.text(error.message)
            error.args = (error.message,)
            error.hint = self.text(error.hint) if error.hint else error.hint
            error.details = self.mask(error.details)
        return error

    def _mask(self, value: Any, pattern: re.Pattern[str] | None, whole: frozenset[str]) -> Any:
        if isinstance(value, str):
            if value in whole:
                return MASK
            return pattern.sub(MASK, value) if pattern is not None else value
        if isinstance(value, dict):
            return {self._mask(k, pattern, whole): self._mask(v, pattern, whole)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._mask(v, pattern, whole) for v in value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            shown = str(value)
            if shown in whole or (pattern is not None and pattern.search(shown)):
                return MASK
        return value


# -- logs --------------------------------------------------------------------------------

class MaskingFilter(logging.Filter):
    """A handler filter that masks the values of every watched redactor in a record's
    message, arguments, traceback and stack (before any handler formats or sends it)."""

    def __init__(self) -> None:
        super().__init__()
        self.redactors: list[Redactor] = []

    def filter(self, record: logging.LogRecord) -> bool:
        for redactor in [r for r in self.redactors if r]:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record is logging's to report
                return True
            masked = redactor.text(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redactor.text(record.exc_text)
            if record.stack_info:
                record.stack_info = redactor.text(record.stack_info)
        return True


#: One filter for the process: log handlers are process-wide, and so is what they send.
_FILTER = MaskingFilter()


def holds_watched_secret(text: str) -> bool:
    """Whether ``text`` contains a secret value of a run of this process (a watched
    redactor's): what a tool must not send out of planrun (``message.send``)."""
    return any(redactor.text(text) != text for redactor in list(_FILTER.redactors) if redactor)


def watch_logs(redactor: Redactor) -> None:
    """Mask ``redactor``'s values in every log record of this process from now on, on
    every handler there is now (Prefect's API log handler and console included).

    The redactor stays watched for the life of the process: Prefect still logs about a run
    (its final state, a traceback) after the run's own code has returned.
    """
    if redactor not in _FILTER.redactors:
        _FILTER.redactors.append(redactor)
    loggers = [logging.getLogger(), *(logger for logger in
                                      list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
