"""planrun.redact: redaction by key name, in URLs and headers, and of registered values."""

from __future__ import annotations

import logging

import pytest

from planrun.errors import ConfigurationError
from planrun.redact import (
    MASK,
    MaskingFilter,
    Redactor,
    redact,
    redact_headers,
    redact_url,
    request_credentials,
    watch_logs,
)

CANARY = "canary-7f3a9b"


def test_credential_keys_are_redacted_at_any_depth() -> None:
    value = {"q": "ok", "api_key": "k", "nested": [{"Authorization": "Bearer x", "n": 1}]}
    assert redact(value) == {"q": "ok", "api_key": MASK,
                             "nested": [{"Authorization": MASK, "n": 1}]}


def test_a_url_loses_its_password_and_token_like_query_values() -> None:
    assert redact_url("https://u:pw@h.example/p?token=abc&q=1") == (
        "https://u:redacted@h.example/p?token=redacted&q=1")
    assert redact_url("https://h.example/p?q=1") == "https://h.example/p?q=1"
    assert redact({"url": "https://u:pw@h.example/"}) == {"url": "https://u:redacted@h.example/"}


def test_credential_headers_are_redacted_whatever_their_case() -> None:
    assert redact_headers({"authorization": "Bearer x", "X-API-Key": "k", "Accept": "*/*"}) == {
        "authorization": MASK, "X-API-Key": MASK, "Accept": "*/*"}


def test_request_credentials_include_a_bearer_token_alone() -> None:
    found = request_credentials("https://u:hunter22@h.example/?sig=abcdef",
                                {"Authorization": "Bearer tok-12345"}, {"api_key": "qwerty"})
    assert {"Bearer tok-12345", "tok-12345", "hunter22", "abcdef", "qwerty"} <= set(found)


def test_a_registered_value_is_masked_inside_longer_strings_keys_and_nested_data() -> None:
    redactor = Redactor([CANARY])
    value = {"text": f"a {CANARY} b", CANARY: [f"x{CANARY}", ("t", CANARY)], "n": 3}
    assert redactor.mask(value) == {"text": f"a {MASK} b", MASK: [f"x{MASK}", ["t", MASK]],
                                    "n": 3}


def test_escaped_and_percent_encoded_forms_are_masked_too() -> None:
    secret = 'pa ss"wo/rd\n'
    redactor = Redactor([secret])
    assert "wo" not in redactor.text(f"json: {repr(secret)}, url: ?p=pa%20ss%22wo%2Frd%0A")
    assert redactor.text('{"p": "pa ss\\"wo/rd\\n"}') == '{"p": "***"}'


def test_numbers_that_are_secrets_are_masked_and_other_types_are_kept() -> None:
    redactor = Redactor([424242, {"pin": "9876"}])
    assert redactor.mask([424242, 9876, 1, 2.5, True, None]) == [MASK, MASK, 1, 2.5, True, None]
    assert redactor.text("pin 9876 code 424242") == f"pin {MASK} code {MASK}"


def test_a_short_value_is_masked_only_where_it_is_the_whole_string() -> None:
    redactor = Redactor(["ab"])
    assert redactor.mask(["ab", "abc cab"]) == [MASK, "abc cab"]


def test_the_longest_value_wins_where_values_overlap() -> None:
    redactor = Redactor(["secret", "secret-longer"])
    assert redactor.text("x secret-longer y") == f"x {MASK} y"


def test_an_empty_redactor_returns_the_very_same_value() -> None:
    value = {"a": [1, "b"]}
    assert Redactor().mask(value) is value
    assert not Redactor()


def test_an_error_is_scrubbed_in_place() -> None:
    error = ConfigurationError(f"bad {CANARY}", hint=f"try {CANARY}",
                               details={"k": [CANARY]})
    assert Redactor([CANARY]).scrub_error(error) is error
    assert CANARY not in str(error) + error.message + str(error.hint) + str(error.details)


def test_watched_values_are_masked_in_log_records_and_tracebacks(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("planrun.test_redact")
    with caplog.at_level(logging.INFO, logger="planrun.test_redact"):
        watch_logs(Redactor([CANARY]))  # on every handler there is: pytest's too
        log.info("value %s here", CANARY)
        try:
            raise ValueError(CANARY)
        except ValueError:
            log.exception("failed with %r", {"k": CANARY})
    assert CANARY not in caplog.text
    assert f"value {MASK} here" in caplog.text


def test_a_url_httpx_cannot_parse_is_returned_as_it_was() -> None:
    assert redact_url("http://[::1") == "http://[::1"


def test_the_credentials_of_a_request_to_an_unparsable_url_still_include_its_headers() -> None:
    found = request_credentials("http://[::1", {"Authorization": f"Bearer {CANARY}"},
                                {"api_key": "query-secret-1"})
    assert CANARY in found and "query-secret-1" in found


def test_a_log_record_whose_stack_holds_a_secret_is_masked() -> None:
    masking = MaskingFilter()
    masking.redactors.append(Redactor([CANARY]))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "here", None, None,
                               sinfo=f"Stack (most recent call last):\n  x = '{CANARY}'")
    assert masking.filter(record)
    assert CANARY not in (record.stack_info or "") and MASK in (record.stack_info or "")


def test_a_malformed_log_record_is_passed_on_for_logging_to_report() -> None:
    masking = MaskingFilter()
    masking.redactors.append(Redactor([CANARY]))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s and %s", ("one",), None)
    assert masking.filter(record)
    assert (record.msg, record.args) == ("%s and %s", ("one",))
