"""The limits every template renders within (docs/templates.md).

Jinja's sandbox keeps a plan's templates away from Python's internals; it does not stop
them from asking for a gigabyte (``'x'|center(10**9)``) or for a hundred million loop
steps. Here, on top of it:

- what a template would build is measured *before* it is built: printed text, joins,
  padding, ``format``/``%``, ``~``, ``+`` and ``*`` (MAX_OUTPUT characters, MAX_REPEAT
  items, MAX_WIDTH for a field width, MAX_BITS for integers);
- every loop step and every call counts against MAX_STEPS per render;
- a render ends at its next step once MAX_RENDER_S have passed or its caller gave up on it
  (a thread cannot be killed: it is asked to stop).

``planrun.template_sandbox`` applies them to Jinja.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MappingView
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast

from jinja2.utils import Namespace, generate_lorem_ipsum

#: Characters one render may print in all (``{{ }}`` and text, inside loops and macros
#: too), and the most one value (a join, a padded field, a concatenation) may hold.
MAX_OUTPUT = 1_000_000
#: The most items (characters, list entries) one ``*`` may produce.
MAX_REPEAT = 100_000
#: The widest field ``center``, ``indent``, ``format``, ``'%5s'``, ``'{:>5}'`` may pad to.
MAX_WIDTH = 100_000
#: The largest exponent of ``**``, and the most bits an integer ``**`` or ``*`` may make.
MAX_EXPONENT = 256
MAX_BITS = 100_000
#: Loop steps and calls (macros, methods, ``range``...) of one render, all loops together.
MAX_STEPS = 100_000
#: The longest one render may take when its step has no shorter timeout.
MAX_RENDER_S = 10.0
#: The widest ``round`` precision (``10**precision`` is computed).
MAX_PRECISION = 100


class OverLimit(Exception):
    """A template asked for more than a limit allows; the message names the limit."""


def _size_text(chars: int) -> str:
    return f"{chars // 1_000_000} MB" if chars >= 1_000_000 else f"{chars:,} characters"


@dataclass
class Budget:
    """What one render has used so far; ``stop`` is asked at every step whether to end."""

    seconds: float = MAX_RENDER_S
    stop: Callable[[], bool] | None = None
    stopped: bool = False
    steps: int = 0
    printed: int = 0
    started: float = field(default_factory=time.monotonic)

    def step(self) -> None:
        """One loop step or call: refused past MAX_STEPS, the time limit, or a stop."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise OverLimit(f"template loops or calls more than {MAX_STEPS:,} times")
        if self.stopped or (self.stop is not None and self.stop()):
            raise OverLimit("template rendering stopped: the step ran out of time")
        if time.monotonic() - self.started > self.seconds:
            raise OverLimit(f"template took longer than {self.seconds:g}s to render")

    def print(self, chars: int) -> None:
        """``chars`` more characters of output: refused past MAX_OUTPUT in all."""
        self.printed += chars
        if self.printed > MAX_OUTPUT:
            raise OverLimit(f"template output over {_size_text(MAX_OUTPUT)}")


_BUDGET: ContextVar[Budget | None] = ContextVar("planrun_template_budget", default=None)


@contextmanager
def budget(spent: Budget) -> Iterator[Budget]:
    """Count the renders inside this block against ``spent``."""
    token = _BUDGET.set(spent)
    try:
        yield spent
    finally:
        _BUDGET.reset(token)


def current_budget() -> Budget:
    """The budget of the render under way."""
    # Outside ``budget()`` (a direct render in a test) each operation is still bounded.
    return _BUDGET.get() or Budget()


def measure(value: Any, limit: int = MAX_OUTPUT) -> int:
    """About how many characters ``str(value)`` has, counted no further than past ``limit``:
    cheap for a huge value (a list holding one long text 100,000 times)."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, range):
            total += 24
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, Mapping):
            total += 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, AbstractSet, MappingView)):
            total += 2
            stack.extend(cast(Iterable[Any], item))
        else:
            total += 8
    return total


def check_size(value: Any, what: str = "value") -> None:
    """Refuse a value that would print as more than MAX_OUTPUT characters."""
    if measure(value) > MAX_OUTPUT:
        raise OverLimit(f"template {what} over {_size_text(MAX_OUTPUT)}")


def check_width(width: Any, what: str) -> None:
    """Refuse a field wider than MAX_WIDTH."""
    if isinstance(width, int) and abs(width) > MAX_WIDTH:
        raise OverLimit(f"{what} width {width} is too wide (at most {MAX_WIDTH:,})")


def check_estimate(chars: float, what: str) -> None:
    """Refuse an operation whose result would be over MAX_OUTPUT characters."""
    if chars > MAX_OUTPUT:
        raise OverLimit(f"{what} would make over {_size_text(MAX_OUTPUT)} of text")


_PERCENT = re.compile(r"%(?:\([^)]*\))?([-#0 +]*)(\*|\d*)(?:\.(\*|\d*))?[hlL]?([a-zA-Z%])")


def check_percent(text: Any, args: Any) -> None:
    """Refuse ``text % args`` whose widths or arguments are too large."""
    if not isinstance(text, str):
        return
    for match in _PERCENT.finditer(text):
        for number in match.group(2, 3):
            if number == "*":
                raise OverLimit("'*' widths are not allowed in a template's format")
            if number:
                check_digits(number)
    check_estimate(len(text) + measure(args), "format")


def check_spec(spec: str) -> None:
    """Refuse a ``str.format`` field spec (``>10``, ``.3f``) with too wide a number."""
    for number in re.findall(r"\d+", spec):
        check_digits(number)


def check_digits(number: str) -> None:
    """Refuse a width or precision, given as digits, over MAX_WIDTH."""
    if len(number) > 6 or int(number) > MAX_WIDTH:
        raise OverLimit(f"format width {number} is too wide (at most {MAX_WIDTH:,})")


def str_method_estimate(name: str, text: str | bytes, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> float:
    """How long the result of ``text.name(*args)`` may be, for the methods that can grow."""
    def arg(i: int, key: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in ("center", "ljust", "rjust", "zfill"):
        check_width(arg(0, "width", 0), name)
        return 0
    if name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        check_width(tabsize, name)
        tabs = text.count("\t") if isinstance(text, str) else text.count(b"\t")
        return len(text) + tabs * tabsize
    if name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        times = text.count(old) if old else len(text) + 1
        return len(text) + times * max(0, len(new) - len(old))
    if name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((measure(v) for v in args[0].values()), default=1)
        return len(text) * longest
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        return measure(args[0]) + len(text) * len(args[0])
    return 0


def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    """Jinja's ``lipsum``, refused past MAX_REPEAT words."""
    if n * max > MAX_REPEAT or n * min > MAX_REPEAT:
        raise OverLimit(f"lipsum of {n} paragraphs of up to {max} words is too long "
                        f"(at most {MAX_REPEAT:,} words)")
    return str(generate_lorem_ipsum(n, html, min, max))


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left operator right`` when its result would be too large."""
    if operator == "**":
        if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT \
                and not (isinstance(left, (int, float)) and abs(left) <= 1):
            raise OverLimit(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        if isinstance(left, int) and isinstance(right, int) \
                and abs(left).bit_length() * abs(right) > MAX_BITS:
            raise OverLimit(f"the power {left}**{right} is too large")
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int) \
                and abs(left).bit_length() + abs(right).bit_length() > MAX_BITS:
            raise OverLimit("the product is too large a number")
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int) \
                    and len(seq) * times > MAX_REPEAT:
                raise OverLimit(f"repeating {len(seq)} items {times} times is too "
                                f"much (at most {MAX_REPEAT:,} items)")
    elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
        check_size((left, right), "text or list joined with +")
    elif operator == "%":
        check_percent(left, right)


def check_result(value: Any) -> Any:
    """``value``, unless it is text over MAX_OUTPUT or a collection over MAX_REPEAT items."""
    if isinstance(value, (str, bytes)) and len(value) > MAX_OUTPUT:
        raise OverLimit(f"template value over {_size_text(MAX_OUTPUT)}")
    if isinstance(value, (list, tuple, dict)) and len(value) > MAX_REPEAT:
        raise OverLimit(f"template value of over {MAX_REPEAT:,} items")
    return value
