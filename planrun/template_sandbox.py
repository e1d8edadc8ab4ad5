"""The sandbox templates render in: Jinja's immutable sandbox held to the limits of
``planrun.template_limits`` (docs/templates.md).

Where a template could build something large, a check runs first: ``str`` methods and
calls (``BoundedSandbox.call``), ``str.format`` (its formatter), operators
(``call_binop``), filters (wrapped), loops, literal text and ``~`` (the code generator
routes them through the environment). ``finalize`` needs the render's context, which
keeps Jinja from folding constants at compile time, and the optimizer is off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context, str_join
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import _PassArg
from markupsafe import Markup

from planrun.template_limits import (
    MAX_PRECISION,
    MAX_REPEAT,
    OverLimit,
    check_binop,
    check_estimate,
    check_percent,
    check_result,
    check_size,
    check_spec,
    check_width,
    current_budget,
    lipsum,
    measure,
    str_method_estimate,
)


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, with each field's width and value bounded."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        check_spec(format_spec)
        check_size(value, "format value")
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """The same, for ``Markup`` text (``|safe``)."""


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox within the limits of ``planrun.template_limits``."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(optimized=False, finalize=_finalize, **options)
        self.code_generator_class = _BoundedCodeGenerator
        self.globals["lipsum"] = lipsum
        for name, check in _FILTER_CHECKS.items():
            self.filters[name] = _guarded(self.filters[name], check)
        for name in _STRINGIFYING:
            if name in self.filters and name not in _FILTER_CHECKS:
                self.filters[name] = _guarded(self.filters[name], _check_first)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any,  # noqa: N805
             **kwargs: Any) -> Any:
        current_budget().step()
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, (str, bytes)):
            if name == "join" and args and not isinstance(args[0], (list, tuple, str)):
                args = (list(args[0]), *args[1:])  # measured before it is joined
            check_estimate(len(owner) + str_method_estimate(name, owner, args, kwargs),
                            f"{name}()")
        return check_result(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if super().wrap_str_format(value) is None:
            return None
        f_self: str = value.__self__
        formatter = (_BoundedEscapeFormatter(self, escape=f_self.escape)
                     if isinstance(f_self, Markup) else _BoundedFormatter(self))
        is_map = value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                return type(f_self)(formatter.vformat(f_self, (), args[0]))
            return type(f_self)(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(bounded, value)

    def planrun_loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Every loop's items, one budget step each."""
        spent = current_budget()
        for item in iterable:
            spent.step()
            yield item

    def planrun_text(self, text: str) -> str:
        """A template's literal text, counted as output."""
        current_budget().print(len(text))
        return text

    def planrun_concat(self, parts: tuple[Any, ...]) -> str:
        """``a ~ b``, refused when it would be over MAX_OUTPUT characters."""
        check_size(parts, "text joined with ~")
        return str_join(parts)

@pass_context
def _finalize(context: Context, value: Any) -> Any:
    # Needing the context also keeps Jinja from folding {{ constants }} at compile time.
    current_budget().print(measure(value))
    return value

# -- filters ------------------------------------------------------------------------------

Check = Callable[[list[Any], dict[str, Any]], None]


def _guarded(func: Callable[..., Any], check: Check) -> Callable[..., Any]:
    """``func`` (a Jinja filter) with ``check`` run on its arguments first and its result
    bounded; ``check`` may replace arguments (a generator by the list it gave)."""
    passes = _PassArg.from_obj(func) is not None

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        given = list(args[1:] if passes else args)
        check(given, kwargs)
        call = (args[0], *given) if passes else tuple(given)
        return check_result(func(*call, **kwargs))

    return guarded


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, key: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


def _check_first(args: list[Any], kwargs: dict[str, Any]) -> None:
    if args:
        check_size(args[0], "filter input")


def _check_center(args: list[Any], kwargs: dict[str, Any]) -> None:
    _check_first(args, kwargs)
    check_width(_arg(args, kwargs, 1, "width", 80), "center")


def _check_indent(args: list[Any], kwargs: dict[str, Any]) -> None:
    _check_first(args, kwargs)
    width = _arg(args, kwargs, 1, "width", 4)
    check_width(width, "indent")
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    text = str(args[0]) if args else ""
    check_estimate(len(text) + per_line * (text.count("\n") + 1), "indent")


def _check_format(args: list[Any], kwargs: dict[str, Any]) -> None:
    if args:
        check_percent(args[0], (args[1:], kwargs))


def _check_join(args: list[Any], kwargs: dict[str, Any]) -> None:
    if not args:
        return
    if not isinstance(args[0], (list, tuple, str)):
        args[0] = list(args[0]) if isinstance(args[0], Iterable) else args[0]
    separator = str(_arg(args, kwargs, 1, "d", ""))
    items = args[0] if isinstance(args[0], (list, tuple)) else ()
    check_estimate(measure(items) + len(separator) * len(items), "join")


def _check_replace(args: list[Any], kwargs: dict[str, Any]) -> None:
    if len(args) >= 3:
        text, old, new = str(args[0]), str(args[1]), str(args[2])
        check_estimate(len(text) + str_method_estimate("replace", text, (old, new), {}),
                        "replace")


def _check_count(key: str, index: int) -> Check:
    def check(args: list[Any], kwargs: dict[str, Any]) -> None:
        count = _arg(args, kwargs, index, key, 1)
        if isinstance(count, int) and count > MAX_REPEAT:
            raise OverLimit(f"{key} {count} is too large (at most {MAX_REPEAT:,})")
    return check


def _check_round(args: list[Any], kwargs: dict[str, Any]) -> None:
    precision = _arg(args, kwargs, 1, "precision", 0)
    if isinstance(precision, int) and abs(precision) > MAX_PRECISION:
        raise OverLimit(f"round precision {precision} is too large (at most {MAX_PRECISION})")


def _check_wordwrap(args: list[Any], kwargs: dict[str, Any]) -> None:
    _check_first(args, kwargs)
    text = str(args[0]) if args else ""
    width = _arg(args, kwargs, 1, "width", 79)
    wrap = _arg(args, kwargs, 3, "wrapstring", None) or "\n"
    lines = len(text) // max(width, 1) + text.count("\n") + 1 if isinstance(width, int) else 1
    # textwrap copies the rest of a long word for each line it cuts: lines x length.
    if lines > 10_000 or len(text) > MAX_REPEAT:
        raise OverLimit(f"wordwrap of {len(text):,} characters into {lines:,} lines is too "
                        f"much (at most {MAX_REPEAT:,} characters, 10,000 lines)")
    check_estimate(len(text) + len(str(wrap)) * lines, "wordwrap")


def _check_sum(args: list[Any], kwargs: dict[str, Any]) -> None:
    if args and not isinstance(args[0], (list, tuple)) and isinstance(args[0], Iterable):
        args[0] = list(args[0])
    if args and not isinstance(_arg(args, kwargs, 2, "start", 0), (int, float)):
        check_size(args[0], "sum")


_FILTER_CHECKS: dict[str, Check] = {
    "center": _check_center, "indent": _check_indent, "format": _check_format,
    "join": _check_join, "replace": _check_replace, "batch": _check_count("linecount", 1),
    "slice": _check_count("slices", 1), "round": _check_round, "wordwrap": _check_wordwrap,
    "sum": _check_sum,
}
#: Filters that turn their input into text: a list holding one long text many times would
#: become gigabytes of it.
_STRINGIFYING = ("string", "tojson", "pprint", "urlencode", "escape", "e", "forceescape",
                 "xmlattr", "urlize", "striptags", "title", "capitalize", "upper", "lower",
                 "trim", "truncate", "wordcount")

# -- the code generator -------------------------------------------------------------------

class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, routing loops, literal text and ``~`` through the
    environment's counted versions."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("planrun_loop"), [node.iter], [],
                               None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.planrun_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _output_const_repr(self, group: Iterable[Any]) -> str:
        return f"environment.planrun_text({super()._output_const_repr(group)})"
