"""Serve this example's page on 127.0.0.1 and run plan.yaml against it.

    .venv/bin/python examples/browser/run.py [planrun run options, e.g. --json]

The page is served from site/ on a free port by Python's own HTTP server, in this process;
it stops when the run ends. The exit code is planrun run's.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the run's own output is what matters


def main(argv: list[str]) -> int:
    handler = functools.partial(QuietHandler, directory=str(HERE / "site"))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{site.server_address[1]}/"
        run = [sys.executable, "-m", "planrun.cli", "run", str(HERE / "plan.yaml"),
               "--input", f"url={url}", *argv]
        try:
            return subprocess.run(run).returncode
        finally:
            site.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
