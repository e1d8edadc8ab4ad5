"""Reading a plan file: bytes → YAML nodes → plain data, remembering where every value
and key stands in the file so that each problem can be reported as ``file:line:col``."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml

from planrun.errors import Problem

MAX_PLAN_BYTES = 5 * 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 100

Path_ = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$-]+")


def format_path(path: Path_) -> str:
    """``('steps', 2, 'with', 'url')`` → ``steps[2].with.url``; the root is ``plan``.

    A key that is not a plain word is quoted (``with["a b"]``), with spaces escaped, so
    that a path never holds a space and ``file:line:col: path: message`` stays parseable.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += "[" + json.dumps(part).replace(" ", "\\u0020") + "]"
    return text or "plan"


@dataclass
class Source:
    """A loaded plan document and the positions of its values and mapping keys."""

    file: str
    data: Any = None
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        """The (line, column) of ``path``'s value (or key), else of its nearest parent."""
        table = self.keys if key else self.values
        for cut in range(len(path), -1, -1):
            where = table.get(path[:cut]) or self.values.get(path[:cut])
            if where:
                return where
        return (1, 1)

    def problem(self, path: Path_, message: str, *, key: bool = False) -> Problem:
        line, column = self.locate(path, key=key)
        return Problem(self.file, line, column, format_path(path), message)


_BAD = object()  # a scalar that could not be constructed (already reported)


class _TooLarge(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, where: tuple[int, int]) -> None:
        self.where = where


def read_plan(path: str | os.PathLike[str]) -> tuple[bytes | None, list[Problem]]:
    """The bytes of the plan file at ``path``, or the problems that stop it being read.

    No more than MAX_PLAN_BYTES + 1 bytes are ever read: a huge file, ``/dev/zero`` or a
    pipe that never ends is refused at that point. A named pipe nobody writes to reads
    as empty rather than waiting forever.
    """
    file = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return None, [_unreadable(file, exc)]
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return None, [Problem(file, 0, 0, "plan", "cannot read the file: it is a directory")]
        if stat.S_ISREG(info.st_mode) and info.st_size > MAX_PLAN_BYTES:
            return None, [_too_many_bytes(file, f"{info.st_size} bytes")]
        os.set_blocking(fd, True)
        raw = _read_at_most(fd, MAX_PLAN_BYTES + 1)
    except OSError as exc:
        return None, [_unreadable(file, exc)]
    finally:
        os.close(fd)
    if len(raw) > MAX_PLAN_BYTES:
        return None, [_too_many_bytes(file, f"more than {MAX_PLAN_BYTES} bytes")]
    return raw, []


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _unreadable(file: str, exc: OSError) -> Problem:
    return Problem(file, 0, 0, "plan", f"cannot read the file: {exc.strerror or exc}")


def _too_many_bytes(file: str, size: str) -> Problem:
    return Problem(file, 1, 1, "plan", f"the file is {size}; a plan may be at most "
                                       f"{MAX_PLAN_BYTES} bytes")


def _decode(raw: bytes, file: str) -> tuple[str | None, list[Problem]]:
    if len(raw) > MAX_PLAN_BYTES:
        return None, [_too_many_bytes(file, f"{len(raw)} bytes")]
    if b"\x00" in raw:
        return None, [Problem(file, 1, 1, "plan", "the file is binary, not YAML text")]
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, [Problem(file, line, column, "plan",
                              f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x})")]


def load(raw: bytes | str, file: str = "<plan>") -> tuple[Source, list[Problem]]:
    """Parse one YAML document; problems are returned, never raised."""
    source = Source(file)
    if isinstance(raw, bytes):
        text, problems = _decode(raw, file)
        if text is None:
            return source, problems
    elif len(raw) > MAX_PLAN_BYTES:
        return source, [_too_many_bytes(file, f"{len(raw)} characters")]
    else:
        text = raw
    try:
        documents = list(yaml.compose_all(text, Loader=_Loader))  # type: ignore[arg-type]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        return source, [Problem(file, line, column, "plan", f"YAML syntax error: {what}")]
    except yaml.reader.ReaderError as exc:  # a control character: locate it in the text
        at = exc.position
        line, column = text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1
        return source, [Problem(file, line, column, "plan", f"the character "
                                f"#x{exc.character:04x} is not allowed in YAML: {exc.reason}")]
    except yaml.YAMLError as exc:
        return source, [Problem(file, 1, 1, "plan", f"YAML error: {' '.join(str(exc).split())}")]
    except _TooLarge:
        return source, [Problem(file, 1, 1, "plan", _too_large())]
    except _TooDeep as exc:
        return source, [Problem(file, *exc.where, "plan", _too_deep())]
    documents = [d for d in documents if d is not None]
    if len(documents) != 1:
        count = "no" if not documents else f"{len(documents)}"
        return source, [Problem(file, 1, 1, "plan",
                                f"the file holds {count} YAML documents; a plan is exactly one")]
    node = documents[0]
    if not isinstance(node, yaml.MappingNode):
        return source, [Problem(file, node.start_mark.line + 1, node.start_mark.column + 1,
                                "plan", "a plan must be a mapping with version, name and steps")]
    walker = _Walker(source)
    try:
        source.data = walker.build(node, ())
    except _TooLarge:
        return source, [Problem(file, 1, 1, "plan", _too_large())]
    except _TooDeep as exc:
        return source, [Problem(file, *exc.where, "plan", _too_deep())]
    return source, walker.problems


def _too_large() -> str:
    return (f"the plan has more than {MAX_NODES} YAML nodes (or expands aliases that far); "
            "make it smaller")


def _too_deep() -> str:
    return f"the plan nests lists and mappings more than {MAX_DEPTH} levels deep"


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, stopped at MAX_NODES nodes and MAX_DEPTH levels while it reads:
    a huge or deeply nested file costs no more than a plan at those limits."""

    nodes = depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooLarge
        if self.depth > MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[attr-defined]
            raise _TooDeep((mark.line + 1, mark.column + 1))
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


if yaml.__with_libyaml__:  # libyaml's parser with the Python composer: ~5x faster

    from yaml._yaml import CParser

    class _Loader(_BoundedComposer, CParser, yaml.resolver.Resolver):  # type: ignore[misc]
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:

    class _Loader(_BoundedComposer, yaml.SafeLoader):  # type: ignore[no-redef]
        pass


class _Walker:
    """Builds plain data from YAML nodes, recording positions and duplicate keys."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.count = 0
        self.constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge
        where = (node.start_mark.line + 1, node.start_mark.column + 1)
        if len(path) > MAX_DEPTH:
            raise _TooDeep(where)
        self.source.values.setdefault(path, where)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        value = self._scalar(node, path)
        if value is _BAD:
            return node.value  # its text, so that later passes do not report it again
        if isinstance(value, float) and not math.isfinite(value):
            self._report(node, path, f"{value} is not a finite number")
        if isinstance(value, bytes):  # a plan must turn into JSON for the run
            self._report(node, path, "binary values (!!binary) cannot be used in a plan")
            return node.value
        return value

    def _scalar(self, node: yaml.Node, path: Path_) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        # A tagged scalar (!!int abc, !!python/name:x) fails in more ways than YAMLError.
        except Exception as exc:  # noqa: BLE001 - every failure is a problem, not a traceback
            problem = isinstance(exc, yaml.MarkedYAMLError) and exc.problem
            message = problem or str(exc).replace("\n", " ")
            self._report(node, path, f"bad YAML value: {message}")
            return _BAD

    def _report(self, node: yaml.Node, path: Path_, message: str) -> None:
        where = (node.start_mark.line + 1, node.start_mark.column + 1)
        self.problems.append(Problem(self.source.file, *where, _fmt(path), message))

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:  # a merge key (<<) of something not a mapping
            self._report(node, path, f"bad merge key: {exc.problem}")
            return {}
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                self.problems.append(Problem(self.source.file, *where, _fmt(path),
                                             "mapping keys must be plain strings"))
                continue
            key = self._scalar(key_node, path)
            if key is _BAD:
                continue
            if not isinstance(key, str):
                key = str(key)
            child = (*path, key)
            where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in result:
                self.problems.append(Problem(self.source.file, *where, _fmt(child),
                                             f"duplicate key '{key}'"))
            self.source.keys[child] = where
            result[key] = self.build(value_node, child)
        return result


def _fmt(path: Path_) -> str:
    return format_path(path)
