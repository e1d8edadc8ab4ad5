"""Which programs the policy lets ``shell.run`` start (docs/sandbox.md).

A rule is a glob. One with a ``/`` is matched against the absolute path the program
resolves to on this machine (``/usr/bin/python3*``, ``/opt/tools/*``); one without names
a program found on the system PATH (``git``, ``python3*``): it matches a program whose
name fits and which lies in one of the system PATH's directories, so that a ``git`` the
plan put in its workspace is not "git". The program's path is resolved and normalised
before the check (``/usr/bin/git/../../../bin/sh`` is ``/bin/sh``), and that path is what
runs, so what was checked is what starts.
"""

from __future__ import annotations

import errno
import os
import shutil
from fnmatch import fnmatchcase

from planrun.errors import ConfigurationError

#: Where a rule without a ``/`` may find its program.
SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin")


def resolve_program(program: str, cwd: str, search_path: str) -> str:
    """The absolute, normalised path ``program`` names: relative to ``cwd`` if it has a
    ``/``, else the first executable of that name on ``search_path``."""
    if "/" in program:
        resolved = os.path.normpath(os.path.join(cwd, program))
        if not os.path.exists(resolved):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        return resolved
    dirs = os.pathsep.join(os.path.join(cwd, d) for d in search_path.split(os.pathsep) if d)
    found = shutil.which(program, path=dirs)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return os.path.normpath(found)


def allows(rule: str, resolved: str) -> bool:
    """Whether ``rule`` covers the program at the absolute path ``resolved``."""
    if "/" in rule:
        return fnmatchcase(resolved, rule)
    folder, name = os.path.split(resolved)
    return folder in SYSTEM_PATH and fnmatchcase(name, rule)


def allowed_argv(argv: list[str], cwd: str, search_path: str, rules: list[str] | None
                 ) -> list[str]:
    """``argv`` with its program resolved to the path checked against ``rules``; ``argv``
    unchanged when the policy allows every program (``rules`` is None)."""
    if rules is None:
        return argv
    resolved = resolve_program(argv[0], cwd, search_path)
    if not any(allows(rule, resolved) for rule in rules):
        shown = argv[0] if argv[0] == resolved else f"{argv[0]} ({resolved})"
        raise ConfigurationError(
            f"shell.run may not start {shown!r}: the policy allows only {rules}",
            hint="use one of the allowed programs, or ask the operator to add it to "
                 "'executables' in the policy file (docs/sandbox.md)")
    return [resolved, *argv[1:]]
