"""The bridge refuses strangers (issue 8, item 2; docs/http-api.md, "Authentication and
origins"). Each attack is replayed against a real bridge (uvicorn on 127.0.0.1) with real
clients (httpx, websockets, raw sockets, Chromium), and what the client sees is asserted.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIWebSocketRoute, iter_route_contexts
from playwright.sync_api import Page
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from planrun import bridge_token
from planrun.loader import MAX_PLAN_BYTES
from planrun.progress_bridge.ratelimit import DEFAULT_BURST, DEFAULT_PER_S, TokenBuckets
from tests.helpers import PLANRUN, ROOT, cli
from tests.progress_bridge.conftest import ServedBridge
from tests.stack import free_port

PLAN = {"version": 1, "name": "p", "steps": [{"id": "a", "tool": "core.echo",
                                              "with": {"value": "hi"}}]}
EVIL = "http://evil.example"


class Recorder:
    """A ``submit`` that records what it was asked to start."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def __call__(self, plan: dict[str, Any], inputs: dict[str, Any]) -> str:
        self.calls.append((plan, inputs))
        return f"run-{len(self.calls)}"


Start = Callable[..., ServedBridge]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start bridges with options; each is stopped at the end."""
    started: list[ServedBridge] = []

    def starting(**options: Any) -> ServedBridge:
        bridge = ServedBridge(tmp_path / f"b{len(started)}", **options).start()
        started.append(bridge)
        return bridge

    yield starting
    for bridge in started:
        bridge.stop()


async def closed_with(ws: Any) -> tuple[int, str]:
    """The close code and reason of a socket the bridge closes at once."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            await ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


def ws_close(url: str, **options: Any) -> tuple[int, str]:
    """How the bridge closes a socket opened to ``url``; in a thread of its own, since
    Playwright's sync API keeps an event loop running in this one."""
    async def main() -> tuple[int, str]:
        async with connect(url, proxy=None, open_timeout=5, **options) as ws:
            return await closed_with(ws)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


# ---- the token --------------------------------------------------------------------------


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_but_healthz_answers_401_without_the_token(start: Start) -> None:
    bridge = start()
    routes = list(iter_route_contexts(bridge.app.routes))  # included routers' too
    http_routes = [(method, r.path) for r in routes for method in sorted(r.methods or ())
                   if method != "HEAD"]
    sockets = [r.path for r in routes if isinstance(r.original_route, APIWebSocketRoute)]
    paths = {path for _, path in http_routes}
    assert {"/metrics", "/docs", "/redoc", "/openapi.json", "/v1/runs",
            "/v1/runs/{run_id}/events", "/v1/runs/{run_id}/view"} <= paths  # found them all
    assert sockets == ["/v1/runs/{run_id}/ws"]
    with httpx.Client(base_url=bridge.http, timeout=10) as http:
        for method, path in http_routes:
            for credentials in ({}, {"Authorization": "Bearer wrong"}):
                answer = http.request(method, concrete(path), json={} if method == "POST"
                                      else None, headers=credentials)
                if path == "/healthz":
                    assert answer.status_code == 200
                    continue
                assert answer.status_code == 401, (method, path)
                assert answer.json() == {"detail": "missing or wrong bearer token"}
                assert answer.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/runs/x/view", params={"token": "wrong"}).status_code == 401
    for path in sockets:
        url = f"ws://127.0.0.1:{bridge.port}{concrete(path)}"
        assert ws_close(url) == (1008, "missing or wrong bearer token")
        assert ws_close(url + "?token=wrong") == (1008, "missing or wrong bearer token")
    assert bridge.hub.subscribers() == 0


def test_the_token_is_made_once_private_and_explicit_tokens_win(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANRUN_HOME", str(tmp_path))
    monkeypatch.delenv("PLANRUN_TOKEN", raising=False)
    assert bridge_token.for_client() is None
    # Several starters at once (two `planrun up`, a bridge restarting) agree on one token.
    code = "from planrun import bridge_token; print(bridge_token.ensure())"
    racers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT, env={**os.environ}) for _ in range(4)]
    tokens = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert len(tokens) == 1
    token = tokens.pop()
    file = tmp_path / "bridge.token"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert file.read_text().strip() == token and len(token) >= 40
    assert bridge_token.ensure() == token == bridge_token.for_client()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.token"]  # no drafts left
    monkeypatch.setenv("PLANRUN_TOKEN", "chosen-by-the-operator")
    assert bridge_token.ensure() == "chosen-by-the-operator" == bridge_token.for_client()


# ---- cross-site requests and DNS rebinding -----------------------------------------------


def test_a_text_plain_post_from_a_foreign_origin_is_refused_and_starts_nothing(
        start: Start) -> None:
    recorder = Recorder()
    bridge = start(submit=recorder)
    body = '{"plan": "version: 1\\nname: p\\nsteps: [{id: a, tool: core.echo}]"}'
    simple = {"Content-Type": "text/plain", "Origin": EVIL}
    with httpx.Client(base_url=bridge.http, timeout=10) as http:
        for credentials in ({}, bridge.auth):  # refused even with a leaked token
            refused = http.post("/v1/runs", content=body, headers={**simple, **credentials})
            assert refused.status_code == 403
            assert refused.json() == {"detail": "origin not allowed"}
        # From the bridge's own origin, with the token: still not JSON, still refused.
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            answer = http.post("/v1/runs", content=body,
                               headers={"Content-Type": kind, **bridge.auth})
            assert answer.status_code == 415
            assert answer.json()["detail"] == ("request bodies must be sent as application/json"
                                               f" (Content-Type: {kind})")
        # No body and no type is fine for a control route; a simple type is not.
        assert http.post("/v1/runs/not-a-uuid/pause", headers=bridge.auth).status_code == 404
        assert http.post("/v1/runs/not-a-uuid/pause",
                         headers={"Content-Type": "text/plain", **bridge.auth}).status_code == 415
    assert recorder.calls == []
    assert bridge.store.runs() == []


def test_a_foreign_origin_is_refused_on_http_and_websockets_and_configured_ones_pass(
        start: Start) -> None:
    bridge = start(allowed_origins=["http://ui.example"])
    own = f"http://localhost:{bridge.port}"
    with httpx.Client(base_url=bridge.http, headers=bridge.auth, timeout=10) as http:
        for origin in (EVIL, f"http://evil.example:{bridge.port}", "null"):
            answer = http.get("/v1/runs/x", headers={"Origin": origin})
            assert (answer.status_code, answer.json()) == (403, {"detail": "origin not allowed"})
        for origin in (own, "http://ui.example"):
            assert http.get("/v1/runs/x", headers={"Origin": origin}).status_code == 404
    assert ws_close(bridge.ws_url("r"), origin=EVIL) == (1008, "origin not allowed")
    assert bridge.hub.subscribers() == 0


def test_a_rebinding_host_is_refused_and_configured_hosts_pass(start: Start) -> None:
    bridge = start(allowed_hosts=["planrun.lan"])
    evil = f"evil.example:{bridge.port}"
    with httpx.Client(base_url=bridge.http, headers=bridge.auth, timeout=10) as http:
        for path in ("/healthz", "/v1/runs/x", "/metrics"):
            answer = http.get(path, headers={"Host": evil})
            assert answer.status_code == 403
            assert answer.json()["detail"].startswith("host not allowed")
        for host in (f"localhost:{bridge.port}", f"[::1]:{bridge.port}",
                     f"planrun.lan:{bridge.port}"):
            assert http.get("/healthz", headers={"Host": host}).status_code == 200
        assert http.get("/healthz", headers={"Host": "127.0.0.1:1"}).status_code == 403
    # A page of evil.example whose name now points at 127.0.0.1 opens the socket.
    url = f"ws://{evil}/v1/runs/r/ws?token={bridge.token}"
    assert ws_close(url, host="127.0.0.1", port=bridge.port, origin=f"http://{evil}")[0] == 1008
    assert bridge.hub.subscribers() == 0


class _EvilPage(BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *_args: Any) -> None:
        pass


def test_a_page_of_another_site_in_a_browser_cannot_submit_or_listen(
        start: Start, page: Page) -> None:
    """The attack of the issue, in Chromium: a page on another origin posts a plan as
    ``text/plain`` (no preflight) and opens the run's socket, even knowing the token."""
    recorder = Recorder()
    bridge = start(submit=recorder)
    server = ThreadingHTTPServer(("127.0.0.2", 0), _EvilPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.2:{server.server_address[1]}/")
        with page.expect_response(lambda r: r.url.startswith(bridge.http)) as posted:
            page.evaluate("""([url, body]) => fetch(url, {method: "POST", mode: "no-cors",
                headers: {"Content-Type": "text/plain"}, body}).catch(() => null)""",
                          [f"{bridge.http}/v1/runs?token={bridge.token}",
                           '{"plan": {"version": 1, "name": "p", "steps": []}}'])
        assert posted.value.status == 403
        closed = page.evaluate("""url => new Promise(done => {
            const ws = new WebSocket(url);
            ws.onclose = event => done([event.code, event.reason]);
        })""", bridge.ws_url("r"))
        assert closed == [1008, "origin not allowed"]
    finally:
        server.shutdown()
        server.server_close()
    assert recorder.calls == [] and bridge.hub.subscribers() == 0


def test_no_page_of_the_bridge_tells_another_origin_its_address(start: Start) -> None:
    bridge = start()
    with httpx.Client(base_url=bridge.http, timeout=10) as http:
        for path in ("/v1/runs/r/view", "/docs", "/redoc", "/v1/runs/x", "/healthz"):
            answer = http.get(path, params={"token": bridge.token})
            assert answer.headers["referrer-policy"] == "no-referrer", path
        assert http.get("/docs").headers["referrer-policy"] == "no-referrer"  # the 401 too


# ---- bodies and load ----------------------------------------------------------------------


def test_an_oversized_body_gets_413_before_it_is_read(start: Start) -> None:
    bridge = start()
    head = (f"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1:{bridge.port}\r\n"
            f"Authorization: Bearer {bridge.token}\r\nContent-Type: application/json\r\n")
    # Announced too large: answered from the headers, not one byte of body sent.
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=10) as sock:
        sock.sendall(f"{head}Content-Length: {100 * MAX_PLAN_BYTES}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
    # Streamed without a length: answered while the client is still sending (or, when the
    # bridge's close with our bytes unread resets the connection before we read its
    # answer, closed then: either way it stopped reading near the limit).
    offered = 100 * 2**20
    sent, answer = _stream_until_answered(bridge.port, head, offered)
    assert answer.startswith(b"HTTP/1.1 413 ") or answer == RESET
    assert MAX_PLAN_BYTES < sent < offered / 5  # the bridge stopped reading near the limit


RESET = b"<connection reset>"


def _stream_until_answered(port: int, head: str, offered: int) -> tuple[int, bytes]:
    chunk = b" " * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        sock.setblocking(False)
        sent = 0
        while sent < offered:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            try:
                if readable:
                    sock.setblocking(True)
                    return sent, sock.recv(65536)
                if writable:
                    sent += sock.send(frame)
            except (ConnectionResetError, BrokenPipeError):
                return sent, RESET
        return sent, b""


def test_a_big_plan_validating_does_not_hold_up_other_clients(start: Start) -> None:
    bridge = start(rate_per_s=0)  # this test polls as fast as it can
    steps = [f"  - {{id: s{i}, tool: core.echo, with: {{value: 'step {i} {'x' * 40}'}}}}"
             for i in range(5000)]
    plan = "version: 1\nname: big\nsteps:\n" + "\n".join(steps) + "\n"
    submitted: dict[str, float] = {}

    def submit() -> None:
        began = time.monotonic()
        answer = httpx.post(f"{bridge.http}/v1/runs", json={"plan": plan}, headers=bridge.auth,
                            timeout=120)
        submitted.update(status=answer.status_code, took=time.monotonic() - began)

    submitter = threading.Thread(target=submit)
    latencies: list[float] = []
    with httpx.Client(base_url=bridge.http, timeout=60) as http:
        submitter.start()
        while submitter.is_alive():
            began = time.monotonic()
            assert http.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - began)
    submitter.join()
    assert submitted["status"] == 503  # validated (it took a while), then: no runner here
    # Served all along: answers while it validated, none waiting for the whole validation
    # (validating on the loop made one /healthz wait for all of it). The validating thread
    # shares the GIL, so on a loaded machine an answer may wait a good part of it.
    assert len(latencies) >= 5
    assert max(latencies) < submitted["took"] / 2, (max(latencies), submitted["took"])


def test_a_flood_from_one_client_gets_429_with_retry_after_and_others_go_on(
        start: Start) -> None:
    # One request per 5 s after a burst of 5: the 15 requests and the WebSocket handshake
    # below come before the next one is allowed, however loaded the machine (at 1 a second,
    # a loaded machine had earned the handshake a token by the time it came).
    bridge = start(rate_per_s=0.2, rate_burst=5)
    with httpx.Client(base_url=bridge.http, timeout=10) as http:
        answers = [http.get("/healthz") for _ in range(15)]
        assert [a.status_code for a in answers[:5]] == [200] * 5  # the burst
        refused = [a for a in answers if a.status_code == 429]
        assert len(refused) >= 3  # however slow this machine: 15 asked, about 6 allowed
        retry_after = int(refused[0].headers["retry-after"])
        assert 1 <= retry_after <= 5
        assert refused[0].json() == {"detail": f"too many requests: try again in "
                                               f"{retry_after} s"}
        code, reason = ws_close(bridge.ws_url("r"))
        asked = re.fullmatch(r"too many requests: try again in (\d+) s", reason)
        assert code == 1013 and asked and 1 <= int(asked[1]) <= retry_after, reason
        # Another client address (127.0.0.2 is loopback too) has a budget of its own.
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=bridge.http, transport=other, timeout=10) as neighbour:
            assert neighbour.get("/healthz").status_code == 200
        time.sleep(int(asked[1]))  # what the last answer asks for: then it is served again
        assert http.get("/healthz").status_code == 200


def test_the_default_budget_is_20_a_second_with_bursts_of_40() -> None:
    now = [0.0]
    buckets = TokenBuckets(DEFAULT_PER_S, DEFAULT_BURST, clock=lambda: now[0])
    assert (DEFAULT_PER_S, DEFAULT_BURST) == (20.0, 40)
    assert [buckets.take("a") for _ in range(40)] == [0.0] * 40
    assert buckets.take("a") == pytest.approx(0.05)
    assert buckets.take("b") == 0.0
    now[0] = 1.0
    assert [buckets.take("a") for _ in range(20)] == [0.0] * 20
    assert buckets.take("a") > 0
    assert TokenBuckets(0, 1).take("a") == 0.0  # 0: no limit


# ---- listening beyond loopback ------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["-m", "planrun.progress_bridge", "--host", "0.0.0.0", "--data", "{tmp}"],
    ["-m", "planrun.cli", "up", "--host", "0.0.0.0"],
])
def test_listening_beyond_loopback_without_an_explicit_token_is_refused(
        tmp_path: Path, command: list[str]) -> None:
    port = free_port()
    argv = [sys.executable, *(part.format(tmp=tmp_path) for part in command), "--port",
            str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PLANRUN_TOKEN"}
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env=env)
    assert refused.returncode == 2
    assert "beyond this machine, without an explicit token: set PLANRUN_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr
    # Nothing was started: nothing listens on the port. (Not a bind of it: another worker's
    # outgoing connection may hold that port number for a moment, and the bind then fails.)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_the_cli_says_what_to_do_when_the_bridge_refuses_its_token(start: Start) -> None:
    bridge = start()
    refused = cli("status", "r", env={"PLANRUN_BRIDGE_URL": bridge.http,
                                      "PLANRUN_TOKEN": "not-it"})
    assert refused.returncode == 1
    assert "refused the token (PLANRUN_TOKEN is not its token)" in refused.stderr
    watched = subprocess.run([*PLANRUN, "watch", "r"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PLANRUN_BRIDGE_URL": bridge.http,
                                              "PLANRUN_TOKEN": "not-it"})
    assert watched.returncode == 1 and "refused the token" in watched.stderr
