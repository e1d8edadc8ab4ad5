"""The operator's policy: what a plan may use, per trust level (docs/policy.md).

Two trust levels: ``local`` (a plan file run by its author with ``planrun run FILE``) and
``submitted`` (a plan that came through the bridge or a deployment: written by a model,
untrusted). The policy file (``PLANRUN_POLICY``, else ``policy.yaml`` under the data
directory) gives each level its tools, the executables ``shell.run`` may start, the hosts
network tools may reach, the workspace root and ceilings a plan cannot raise. Without a
file the defaults below apply: ``submitted`` denies loopback, link-local and private
addresses and runs ``shell.run`` only inside the sandbox. A malformed file is an error,
never "allow all".

The trust level of the code running now is a context variable: ``submitted`` unless the
caller that knows better (``planrun run``) says ``local``.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from planrun.errors import PolicyInvalid
from planrun.policy_limits import OperatorLimits, ToolName

#: The policy file's path; else ``policy.yaml`` under the data directory, if it exists.
POLICY_ENV = "PLANRUN_POLICY"


class Trust(StrEnum):
    """Who wrote the plan: its author on this machine, or a planner (a model)."""

    LOCAL = "local"
    SUBMITTED = "submitted"


class Ceilings(BaseModel):
    """Limits a plan may lower but never raise; None means no ceiling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_parallel: int | None = Field(None, ge=1, description="steps of one run at once")
    step_timeout_s: float | None = Field(None, gt=0, description="longest step timeout")
    output_bytes: int | None = Field(None, ge=1, description="largest output of one step")
    memory_mb: int | None = Field(None, ge=1, description="memory of one step")
    cpu_seconds: int | None = Field(None, ge=1, description="CPU time of one shell.run step")
    processes: int | None = Field(None, ge=1, description="processes of one sandboxed step")
    file_mb: int | None = Field(None, ge=1, description="largest file a sandboxed step writes")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")
_TOOL_GLOB = re.compile(r"[a-z0-9_.*?\[\]!-]+")


@dataclass(frozen=True)
class HostRule:
    """One entry of ``hosts``: a name (``*.example.org`` covers subdomains) or an address
    range, and a port (None: any port)."""

    name: str | None
    network: IPNetwork | None
    port: int | None

    def matches(self, host: str, port: int, addresses: list[ipaddress.IPv4Address
                                                            | ipaddress.IPv6Address]) -> bool:
        """Whether a connection to ``host:port`` that resolved to ``addresses`` is covered."""
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            return bool(addresses) and all(a in self.network for a in addresses)
        name, host = (self.name or "").rstrip("."), host.lower().rstrip(".")
        if name.startswith("*."):
            return host.endswith(name[1:])
        return host == name


def parse_host_rule(text: str) -> HostRule:
    """``host``, ``host:port``, ``*.domain``, ``10.0.0.0/8``, ``[::1]:8080`` → a HostRule;
    ValueError says what is wrong."""
    body, port = _split_port(text.strip().lower())
    try:
        return HostRule(None, ipaddress.ip_network(body, strict=False), port)
    except ValueError:
        pass
    if "/" in body or ":" in body or not _NAME.fullmatch(body):
        raise ValueError(f"{text!r} is not a host, host:port, *.domain, address or CIDR range")
    return HostRule(body, None, port)


def _split_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):  # [v6]:port or [v6]
        host, _, rest = text[1:].partition("]")
        return host, _port(rest.removeprefix(":"), text) if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _port(port, text)
    return text, None


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: the port must be a number from 1 to 65535")
    return int(text)


def _host_rule(value: str) -> str:
    parse_host_rule(value)
    return value


def _tool_glob(value: str) -> str:
    if not _TOOL_GLOB.fullmatch(value):
        raise ValueError(f"{value!r} is not a tool name or glob like 'core.*'")
    return value


def _executable(value: str) -> str:
    if not value.strip() or "\x00" in value or value.endswith("/"):
        raise ValueError(f"{value!r} is not a program name or absolute path")
    if "/" in value and not value.startswith("/"):
        raise ValueError(f"{value!r}: a path must be absolute (or give a name on PATH)")
    return value


def _bind(value: str) -> str:
    path = value.removesuffix(":rw").removesuffix(":ro")
    if not path.startswith("/") or "\x00" in path:
        raise ValueError(f"{value!r} is not an absolute path (add :rw to bind it writable)")
    return value


HostText = Annotated[str, AfterValidator(_host_rule)]
ToolGlob = Annotated[str, AfterValidator(_tool_glob)]
Executable = Annotated[str, AfterValidator(_executable)]
Bind = Annotated[str, AfterValidator(_bind)]


class LevelPolicy(BaseModel):
    """What plans of one trust level may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Glob patterns of the tools allowed (``core.*``); None allows every registered tool.
    tools: list[ToolGlob] | None = None
    #: Executables ``shell.run`` may start (names looked up on PATH, or absolute paths,
    #: glob patterns allowed); None allows any.
    executables: list[Executable] | None = None
    #: Hosts network tools may reach: ``host``, ``host:port``, ``*.domain``, an address or
    #: a CIDR range; None allows every public host (see ``allow_private``).
    hosts: list[HostText] | None = None
    #: Whether loopback, link-local and private addresses may be reached at all (hosts
    #: named in ``hosts`` are still required). The Prefect API and the bridge stay out of
    #: reach of ``submitted`` plans whatever this says (adapters/netguard.py).
    allow_private: bool = False
    #: ``required``: ``shell.run`` runs only inside the sandbox (an error where it cannot
    #: start); ``if_available``: sandboxed where bubblewrap works, else unconfined with a
    #: warning; ``off``: never sandboxed.
    sandbox: Literal["required", "if_available", "off"] = "required"
    #: Extra paths the sandbox binds read-only (``/opt/tools``); ``path:rw`` binds writable.
    binds: list[Bind] = Field(default_factory=list)
    #: Whether a sandboxed command may use the network (then only ``hosts``).
    sandbox_network: bool = False
    #: The workspace root; None uses ``PLANRUN_WORKSPACE`` or ``./workspace``.
    workspace_root: str | None = None
    #: Bytes one run may write with its file tools and programs, in MiB; None: no quota.
    workspace_quota_mb: int | None = Field(default=None, ge=1)
    #: A file write is refused when it would leave less free space on the disk than the
    #: lower of these two: ``min_free_mb`` MiB, ``min_free_percent`` % of the disk.
    min_free_mb: int = Field(default=100, ge=0)
    min_free_percent: float = Field(default=5.0, ge=0, le=100)
    ceilings: Ceilings = Field(default_factory=lambda: Ceilings.model_validate({}))

    def host_rules(self) -> list[HostRule] | None:
        """``hosts`` parsed (they were checked when the policy was read)."""
        return None if self.hosts is None else [parse_host_rule(h) for h in self.hosts]


class BreakerSettings(BaseModel):
    """One tool's circuit breaker (flows/breakers.py, docs/policy.md): it opens after
    ``failures`` transient or resource failures within ``window_s`` seconds, in any run,
    and lets one trial call through ``cooldown_s`` seconds later."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Failures within the window that open the breaker.
    failures: int = Field(5, ge=1, le=100)
    #: How far back failures count, in seconds.
    window_s: float = Field(60.0, gt=0, le=86400)
    #: How long the breaker stays open before one trial call, in seconds.
    cooldown_s: float = Field(30.0, gt=0, le=86400)
    #: False turns the tool's breaker off.
    enabled: bool = True


LOCAL_DEFAULT = LevelPolicy(allow_private=True, sandbox="if_available")
SUBMITTED_DEFAULT = LevelPolicy()


class Policy(BaseModel):
    """The whole policy file: one section per trust level."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local: LevelPolicy = LOCAL_DEFAULT
    submitted: LevelPolicy = SUBMITTED_DEFAULT
    #: Circuit breakers by tool name, over the defaults of flows/breakers.py; they apply
    #: to every run whatever its trust level.
    breakers: dict[ToolName, BreakerSettings] = Field(default_factory=dict)
    #: Concurrency and rate limits, and load thresholds, for every run whatever its trust
    #: level (planrun/policy_limits.py, docs/limits.md).
    limits: OperatorLimits = Field(default_factory=lambda: OperatorLimits.model_validate({}))

    def level(self, trust: Trust) -> LevelPolicy:
        """The rules for plans of ``trust``."""
        return self.local if trust == Trust.LOCAL else self.submitted


def policy_file() -> Path | None:
    """The policy file in effect: ``PLANRUN_POLICY`` (which must exist), else
    ``policy.yaml`` under the data directory if there is one, else None (the defaults)."""
    named = os.environ.get(POLICY_ENV, "").strip()
    if named:
        return Path(named)
    from planrun.home import data_root

    default = data_root() / "policy.yaml"
    return default if default.exists() else None


#: Within :func:`one_policy`: the policy in effect, once it was first looked up there.
_PINNED: contextvars.ContextVar[list[Policy] | None] = contextvars.ContextVar(
    "planrun_pinned_policy", default=None)


@contextmanager
def one_policy() -> Iterator[None]:
    """Within the body, :func:`load_policy` with no path looks for the file once (at its
    first call) and then answers the same. A step's attempt is such a body: its context,
    limits, breaker and tool each ask, and every look is syscalls on the event loop that
    wait for the GIL behind Prefect's threads (BENCHMARKS.md). A changed file applies
    from the next attempt."""
    token = _PINNED.set([])
    try:
        yield
    finally:
        _PINNED.reset(token)


def load_policy(path: str | Path | None = None) -> Policy:
    """The operator's policy from ``path`` (else ``policy_file()``), or the defaults when
    there is no file. A file that is missing (when named), unreadable or malformed raises
    PolicyInvalid listing every problem at its ``file:line:col``. Read once per change
    of the file (its path, modification time and size); looked for once in
    :func:`one_policy`."""
    if path is None:
        pinned = _PINNED.get()
        if pinned:
            return pinned[0]
        policy = _load_policy(policy_file())
        if pinned is not None:
            pinned.append(policy)
        return policy
    return _load_policy(Path(path))


def _load_policy(where: Path | None) -> Policy:
    if where is None:
        return _DEFAULTS()
    try:
        stat = where.stat()
    except OSError as exc:
        raise PolicyInvalid(str(where), [f"{where}: cannot read the policy file: "
                                         f"{exc.strerror or exc} (set {POLICY_ENV} to an "
                                         "existing file, or unset it)"]) from None
    return _read_policy(str(where), stat.st_mtime_ns, stat.st_size)


#: The policy without a file, made once (it is frozen).
_DEFAULTS = lru_cache(maxsize=1)(Policy)


@lru_cache(maxsize=8)
def _read_policy(file: str, mtime_ns: int, size: int) -> Policy:
    from planrun.loader import load

    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        raise PolicyInvalid(file, [f"{file}: cannot read the policy file: "
                                   f"{exc.strerror or exc}"]) from None
    source, problems = load(raw, file)
    if source.data is None or problems:
        raise PolicyInvalid(file, [_policy_words(str(p)) for p in problems])
    try:
        return Policy.model_validate(source.data)
    except ValidationError as exc:
        found = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = tuple(p for p in err["loc"] if not isinstance(p, str) or "[" not in p)
            unknown = err["type"] == "extra_forbidden"
            message = "unknown key" if unknown else err["msg"].removeprefix("Value error, ")
            found.append(source.problem(loc, message, key=unknown))
        raise PolicyInvalid(file, [_policy_words(str(p)) for p in sorted(found)]) from None


def _policy_words(text: str) -> str:
    """The plan loader's words about a policy file."""
    return text.replace(": plan: ", ": policy: ").replace("a plan", "a policy") \
        .replace("the plan", "the policy")


_TRUST: contextvars.ContextVar[Trust] = contextvars.ContextVar("planrun_trust",
                                                               default=Trust.SUBMITTED)


def current_trust() -> Trust:
    """The trust level of the plan being validated or run here: ``submitted`` by default."""
    return _TRUST.get()


@contextmanager
def trusted_as(trust: Trust) -> Iterator[None]:
    """Run the body at ``trust`` (``planrun run`` uses ``local``)."""
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)
