"""Templates in plans: ``{{ inputs.NAME }}``, ``{{ steps.ID.output... }}``,
``{{ steps.ID.status }}``, ``{{ run.id }}`` and ``{{ secrets.NAME }}`` (docs/secrets.md).

Rendered by Jinja2's sandbox (never ``eval``), within the limits of
``planrun.template_limits``, off the event loop (``render_async``). A string that is
exactly one ``{{ ... }}`` keeps the type of its value (a list stays a list); any other
string renders to text. Checking a plan only parses and analyses its templates: nothing
in them is evaluated then (docs/templates.md).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame

from planrun import template_limits as limits
from planrun.loader import format_path
from planrun.template_sandbox import BoundedSandbox

#: What a template may read of a step: ``steps.ID.<field>``.
STEP_FIELDS = ("output", "status", "error", "attempts", "reason", "fallback_used")
NAMES = ("inputs", "steps", "run", "secrets")

#: The longest template one string may hold, and the most template text of one plan:
#: checking a plan parses every template, which takes about a second per 200,000 characters.
MAX_TEMPLATE = 20_000
MAX_PLAN_TEMPLATES = 250_000

_WHOLE = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)

_ENV = BoundedSandbox(undefined=StrictUndefined, autoescape=False)


class TemplateError(Exception):
    """A template could not be parsed or rendered; the message says why."""


def has_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def templated(value: Any) -> bool:
    """Whether any text in ``value`` (nested in mappings and lists) is a template."""
    if isinstance(value, str):
        return has_template(value)
    if isinstance(value, dict):
        return any(templated(item) for item in value.values())
    if isinstance(value, list):
        return any(templated(item) for item in value)
    return False


def condition(when: str) -> str:
    """A ``when`` as a template: ``steps.a.status == 'failed'`` means ``{{ ... }}``."""
    return when if has_template(when) else "{{ " + when + " }}"


#: The name of a reference to ``steps`` that is not a fixed ``steps.ID``.
DYNAMIC = "*"


@dataclass(frozen=True)
class Reference:
    """One ``steps.ID[.field]`` or ``inputs.NAME`` a template reads."""

    root: str
    name: str
    field: str | None = None


@lru_cache(maxsize=4096)
def _parse(text: str) -> nodes.Template:
    try:
        return _ENV.parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from None
    except RecursionError:
        raise TemplateError("the template is nested too deeply") from None


def references(text: str) -> tuple[list[Reference], set[str]]:
    """The steps and inputs ``text`` reads, and any unknown top-level names."""
    if len(text) > MAX_TEMPLATE:
        raise TemplateError(f"the template is {len(text):,} characters long; a template may "
                            f"be at most {MAX_TEMPLATE:,}")
    try:
        return _references(text)
    except RecursionError:
        raise TemplateError("the template is nested too deeply") from None


def _references(text: str) -> tuple[list[Reference], set[str]]:
    tree = _parse(text)
    unknown = _undeclared(tree, text) - set(NAMES)
    found: list[Reference] = []
    named: set[int] = set()  # the ``steps`` Name nodes that are looked up by a fixed name
    lookup: Any
    for lookup in tree.find_all((nodes.Getattr, nodes.Getitem)):
        base = lookup.node
        if not (isinstance(base, nodes.Name) and base.name in ("inputs", "steps", "secrets")):
            continue
        name = _key(lookup)
        if name is None:
            continue
        named.add(id(base))
        field = None
        if base.name == "steps":
            field = _parent_field(tree, lookup)
        found.append(Reference(base.name, name, field))
    for node in tree.find_all(nodes.Name):
        if node.name in ("steps", "secrets") and node.ctx == "load" and id(node) not in named:
            found.append(Reference(node.name, DYNAMIC))  # steps[expr], for s in steps, ...
    return found, unknown


#: Statements that bind no names: in a template of only these, every name is read from
#: the context, which is much quicker to find than by Jinja's code generator.
_PLAIN_STATEMENTS = (nodes.Output, nodes.If)
_BUILTIN_NAMES = {*_ENV.globals, "self"}
_OTHER_TEMPLATES = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


def _undeclared(tree: nodes.Template, text: str) -> set[str]:
    """The names template ``text`` (parsed: ``tree``) reads from the context, as
    ``meta.find_undeclared_variables``, after checking that its filters and tests exist."""
    check: Any
    for check in tree.find_all((nodes.Filter, nodes.Test)):
        kind, known = ("filter", _ENV.filters) if isinstance(check, nodes.Filter) else (
            "test", _ENV.tests)
        if check.name not in known:
            raise TemplateError(f"template error: no {kind} named '{check.name}'")
    if any(True for _ in tree.find_all(_OTHER_TEMPLATES)):
        raise TemplateError("template error: a plan's templates cannot extend, include or "
                            "import other templates")
    if all(isinstance(node, _PLAIN_STATEMENTS) for node in tree.find_all(nodes.Stmt)):
        loaded = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"}
        return loaded - _BUILTIN_NAMES
    try:
        names = _Names(_ENV)
        names.visit(tree)  # reads the tree, never changes it: no optimizer
        return names.undeclared
    except TemplateSyntaxError as exc:  # TemplateAssertionError: a block used wrongly
        raise TemplateError(f"template error: {exc.message}") from None


class _Names(CodeGenerator):
    """Jinja's code generator used only to find the names a template reads from its
    context (as ``jinja2.meta``), built without the optimizer: it writes nothing and
    evaluates nothing, so checking ``{{ 'x'|center(10**9) }}`` costs nothing."""

    def __init__(self, environment: BoundedSandbox) -> None:
        super().__init__(environment, "<names>", "<names>", optimized=False)
        self.undeclared: set[str] = set()

    def write(self, x: str) -> None:
        """Writes nothing: only the names matter."""

    def enter_frame(self, frame: Frame) -> None:
        super().enter_frame(frame)
        for action, name in frame.symbols.loads.values():
            if action == "resolve" and name not in self.environment.globals:
                self.undeclared.add(name)


def _key(lookup: Any) -> str | None:
    if isinstance(lookup, nodes.Getattr):
        return str(lookup.attr)
    if isinstance(lookup.arg, nodes.Const) and isinstance(lookup.arg.value, str):
        return lookup.arg.value
    return None


def _parent_field(tree: nodes.Template, inner: nodes.Node) -> str | None:
    outer: Any
    for outer in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if outer.node is inner:
            return _key(outer)
    return None


TemplatePath = tuple[str | int, ...]


def strings(value: Any, path: TemplatePath = ()) -> Iterator[tuple[TemplatePath, str]]:
    """Every string inside ``value`` that holds a template, with its path."""
    if isinstance(value, str):
        if has_template(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings(item, (*path, i))


async def render_async(value: Any, context: dict[str, Any], path: TemplatePath = (), *,
                       seconds: float | None = None,
                       stop: Callable[[], bool] | None = None) -> Any:
    """``render`` in a worker thread, so a slow template never holds the event loop.

    It ends within ``seconds`` (at most MAX_RENDER_S) or once ``stop()`` is true. A caller
    that stops waiting (its timeout, a cancel) makes the thread stop at its next step.
    """
    if not templated(value):  # nothing to render: no worker thread (a copy, as render makes)
        return _render(value, context, path)
    limit = limits.MAX_RENDER_S if seconds is None else min(seconds, limits.MAX_RENDER_S)
    spent = limits.Budget(seconds=limit, stop=stop)
    try:
        return await asyncio.to_thread(render, value, context, path, spent)
    finally:
        spent.stopped = True


def render(value: Any, context: dict[str, Any], path: TemplatePath = (),
           budget: limits.Budget | None = None) -> Any:
    """``value`` with every template in it rendered against ``context``, all of it
    within one budget; a TemplateError names the place (``path``) that failed."""
    with limits.budget(budget or limits.Budget()):
        return _render(value, context, path)


def _render(value: Any, context: dict[str, Any], path: TemplatePath) -> Any:
    if isinstance(value, str):
        if not has_template(value):
            return value
        try:
            return render_string(value, context)
        except TemplateError as exc:
            raise TemplateError(f"{exc} at {format_path(path)}" if path else str(exc)) from None
    if isinstance(value, dict):
        return {key: _render(item, context, (*path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, context, (*path, i)) for i, item in enumerate(value)]
    return value


def render_string(text: str, context: dict[str, Any]) -> Any:
    """Render one string; exactly one ``{{ expr }}`` keeps the expression's type, as
    plain data (text, numbers, true/false, null, lists and mappings with text keys)."""
    try:
        whole = _WHOLE.match(text)
        if whole:
            result = _expression(whole.group("expr").strip())(**context)
            if isinstance(result, Undefined):
                result._fail_with_undefined_error()
            limits.check_size(result, "output")
            return _data(result)
        return _template(text).render(**context)
    except (TemplateError, limits.OverLimit) as exc:
        raise TemplateError(str(exc)) from None
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error in {_show(text)}: {exc.message}") from None
    except RecursionError:
        raise TemplateError(f"cannot render {_show(text)}: it recurses too deeply") from None
    except Exception as exc:  # noqa: BLE001 - Jinja raises many kinds; all mean "cannot render"
        raise TemplateError(f"cannot render {_show(text)}: {exc}") from None


def _show(text: str) -> str:
    return repr(text) if len(text) <= 200 else repr(text[:197] + "...")


def _data(value: Any) -> Any:
    """``value`` as JSON's kinds of data, which every tool takes and every report holds."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TemplateError(f"a mapping's keys must be text; {key!r} is not")
        return {key: _data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, range, Iterator)):
        items = list(islice(value, limits.MAX_REPEAT + 1))
        if len(items) > limits.MAX_REPEAT:
            raise TemplateError(f"template value of over {limits.MAX_REPEAT:,} items")
        return [_data(item) for item in items]
    raise TemplateError(f"the template gives a {type(value).__name__}, not text, a number, "
                        "true/false, a list or a mapping")


@lru_cache(maxsize=1024)
def _template(text: str) -> Template:
    return _ENV.from_string(text)


@lru_cache(maxsize=4096)
def _expression(expr: str) -> Any:
    try:
        return _ENV.compile_expression(expr, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from None
    except RecursionError:
        raise TemplateError("the template is nested too deeply") from None


def truthy(value: Any) -> bool:
    """How a rendered ``when`` is read: booleans as is, 'false'/'0'/'' and empties false."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "none", "null")
    return bool(value)
