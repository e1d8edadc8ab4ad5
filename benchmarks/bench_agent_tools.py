"""``search.web`` with a cache hit vs a miss, and ``message.send`` per message.

    .venv/bin/python benchmarks/bench_agent_tools.py [--rounds 50]

Adapter calls (``Adapter.run``, as the engine makes them: validation, the network guard,
error translation), without Prefect, against servers on 127.0.0.1 (tests/agent_servers.py,
the same the tests use): a SearXNG-API server, aiosmtpd (plain SMTP with a login) and a
webhook receiver. Reported: the median and p95 of each, in milliseconds.

- search miss: a new query each round (a request to the provider, parsing, sanitising,
  merging, a cache write); a real provider adds its own think time and the network's;
- search hit: the same query again (the SQLite cache read, no request);
- email: one message per round (a new SMTP session: connect, EHLO, AUTH, MAIL, RCPT, DATA,
  QUIT, the delivery record);
- webhook: one Slack-style POST per round;
- replay: a message already delivered (the delivery log read, nothing sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import median, percentile, table  # noqa: E402


async def timed(call: Any) -> float:
    start = time.perf_counter()
    await call
    return (time.perf_counter() - start) * 1000


async def measure(rounds: int, folder: Path) -> dict[str, list[float]]:
    import os

    from planrun.adapters.base import StepContext
    from planrun.adapters.delivery_log import DeliveryLog
    from planrun.adapters.message import MessageSend
    from planrun.adapters.search import SearchWeb
    from planrun.adapters.search_cache import SearchCache
    from planrun.adapters.workspace import Workspace
    from planrun.policy import LevelPolicy, Trust
    from tests.agent_servers import (
        SMTP_PASSWORD,
        SMTP_USER,
        SearchHandler,
        WebhookHandler,
        serving,
        smtp_server,
    )

    times: dict[str, list[float]] = {k: [] for k in
                                     ("search miss", "search hit", "email", "webhook",
                                      "replay")}
    with serving(SearchHandler) as search, serving(WebhookHandler) as hook, \
            smtp_server("plain") as (_, port):
        tools = folder / "tools.yaml"
        tools.write_text(json.dumps({
            "search": {"provider": "searxng", "url": search.url},
            "channels": {"ops": {"type": "email", "host": "127.0.0.1", "port": port,
                                 "security": "plain", "username": SMTP_USER,
                                 "password_secret": "BENCH_SMTP", "from": "b@example.org"},
                         "hook": {"type": "webhook", "url": hook.url + "/slack/x",
                                  "format": "slack"}}}))
        os.environ["PLANRUN_TOOLS"] = str(tools)
        os.environ["PLANRUN_SECRET_BENCH_SMTP"] = SMTP_PASSWORD
        searcher = SearchWeb(cache=SearchCache(folder / "cache.sqlite3"))
        sender = MessageSend(log=DeliveryLog(folder / "messages.sqlite3"))
        policy = LevelPolicy(allow_private=True, hosts=["127.0.0.1"])
        workspace = Workspace(folder / "ws", backup_dir=folder / "backups")
        for i in range(rounds):
            ctx = StepContext(run_id=f"r{i}", step_id="s", workspace=workspace,
                              trust=Trust.LOCAL, policy=policy)
            query = {"query": f"bench query {i}", "max_results": 10}
            times["search miss"].append(await timed(searcher.run(query, ctx, 30)))
            times["search hit"].append(await timed(searcher.run(query, ctx, 30)))
            mail = {"channel": "ops", "to": ["a@example.org"], "subject": "s", "body": "b"}
            times["email"].append(await timed(sender.run(mail, ctx, 30)))
            times["replay"].append(await timed(sender.run(mail, ctx, 30)))
            times["webhook"].append(await timed(sender.run(
                {"channel": "hook", "body": f"message {i}"}, ctx, 30)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "Session.login_data is deprecated")  # aiosmtpd's own
    with tempfile.TemporaryDirectory(prefix="bench-agent-tools-") as folder:
        times = asyncio.run(measure(args.rounds, Path(folder)))
    rows = [(name, f"{median(v):.2f}", f"{percentile(v, 95):.2f}", len(v))
            for name, v in times.items()]
    print(table(["call", "median ms", "p95 ms", "n"], rows))


if __name__ == "__main__":
    main()
