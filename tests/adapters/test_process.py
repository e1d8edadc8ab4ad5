"""Starting a program and stopping its whole process group (planrun.adapters.process)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from planrun.adapters.process import communicate, spawn, stop


def test_a_program_stopped_before_anyone_read_from_it_is_killed_and_reaped() -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None

    async def stopped() -> tuple[int | None, list[int]]:
        proc = spawn([sleep, "30"], {})
        await stop(proc, [])  # no readers yet: it was cancelled while starting
        return proc.returncode, [proc.stdout, proc.stderr]

    code, pipes = asyncio.run(stopped())
    assert code == -signal.SIGTERM  # reaped: no zombie left behind
    for fd in pipes:  # and its pipes let go
        with pytest.raises(OSError):
            os.fstat(fd)


def _run(argv: list[str], data: bytes | None = None) -> tuple[bytes, bytes, int]:
    async def ran() -> tuple[bytes, bytes, int]:
        (out, _), (err, _), code = await communicate(spawn(argv, {"PATH": "/usr/bin:/bin"}),
                                                     data, 1 << 20)
        return out, err, code

    return asyncio.run(ran())


def test_a_program_gets_the_signals_python_ignores_back_at_their_defaults() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a program started from it must not (a pipeline
    would run on after its reader ended, a file over RLIMIT_FSIZE would not stop it)."""
    grep = shutil.which("grep")
    assert grep is not None
    out, _, code = _run([grep, "SigIgn", "/proc/self/status"])
    assert code == 0
    ignored = int(out.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))


def test_input_and_output_and_the_exit_code_come_through() -> None:
    sh = shutil.which("sh")
    assert sh is not None
    big = b"x" * (1 << 18)  # more than a pipe holds: fed while it is read
    out, err, code = _run([sh, "-c", "wc -c; echo oops >&2; exit 3"], big)
    assert (out.strip(), err, code) == (str(len(big)).encode(), b"oops\n", 3)


def test_with_standard_streams_closed_the_pipes_still_land_where_they_should(
        tmp_path: Path) -> None:
    """planrun started with stdin, stdout and stderr closed: new pipes then take
    descriptors 0-2, and must still reach the launcher as its 0, 1, 2 and its status and
    go pipes as its 3 and 4 (else its report would go to the program's stdout)."""
    script = tmp_path / "closed.py"
    script.write_text(textwrap.dedent("""\
        import asyncio, os
        from pathlib import Path
        from planrun.adapters.launcher import Start, read_report, spawn
        from planrun.adapters.process import communicate
        from planrun.adapters.sandbox import Limits
        report = os.dup(1)
        async def main():
            for fd in (0, 1, 2):  # here: the event loop's own descriptors are taken
                os.close(fd)
            start = Start(["sh", "-c", "cat; echo err >&2"], {"PATH": "/usr/bin:/bin"},
                          Path("/"), Limits(), None, [])
            child, status = spawn(start, True)
            (out, _), (err, _), code = await communicate(child, b"in", 100)
            return out, err, code, read_report(status).usage is not None
        os.write(report, repr(asyncio.run(main())).encode())
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    assert done.stdout == repr((b"in", b"err\n", 0, True)).encode(), done.stderr
