"""A command on a real pseudo-terminal, for the tests of what planrun asks there: what it
printed so far (escape sequences removed), and lines typed into it."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import termios
import threading
from pathlib import Path

from tests.helpers import wait_for

_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\r")


class Terminal:
    """``argv`` with a pseudo-terminal as its stdin, stdout and stderr (160 × 50)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        main, side = os.openpty()
        fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.process = subprocess.Popen(argv, stdin=side, stdout=side, stderr=side, cwd=cwd,
                                        env={**env, "TERM": "xterm-256color"},
                                        start_new_session=True)
        os.close(side)
        self.main = main
        self._output = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.main, 4096)
            except OSError:  # EIO: the command's side is closed
                return
            if not chunk:
                return
            with self._lock:
                self._output += chunk

    def text(self) -> str:
        """Everything printed so far, as plain text."""
        with self._lock:
            return _ESCAPES.sub(b"", self._output).decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first match of ``pattern`` in the output, once it is there."""
        found: re.Match[str] = wait_for(lambda: re.search(pattern, self.text()), timeout,
                                        f"{pattern!r} on the terminal; it shows:\n"
                                        f"{self.text()[-3000:]}")
        return found

    def type(self, line: str) -> None:
        """Type ``line`` and Enter."""
        os.write(self.main, line.encode() + b"\r")

    def wait(self, timeout: float = 90) -> int:
        """The command's exit code, once it has ended (and its output was read)."""
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        os.close(self.main)
