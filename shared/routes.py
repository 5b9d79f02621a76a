"""S5 in one place: which messages each subject may carry.

A message is what its subject says it is. The table below maps every subject
pattern hafence uses to the message types it carries, and which subject tokens
must equal which payload fields (``host.{host}.{kind}`` carries a ``HostEvent``
whose ``host`` and ``kind`` are the subject's tokens). The bus decodes every
message with the decoder its *subject* picks, never by its JSON tag alone, and
checks the tokens: an agent allowed to publish on ``inventory.<its host>`` can
put nothing there but its own host's inventory.

Hostile bodies are refused before decoding: longer than ``MAX_MESSAGE_BYTES`` or
nested deeper than ``MAX_NESTING`` (msgspec recurses on nesting and raises
``RecursionError`` past Python's limit).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, get_args

import msgspec

from hafence.contracts import (
    NAME_PATTERN,
    Alert,
    DeadLetter,
    FenceRequest,
    FenceResult,
    Heartbeat,
    HostEvent,
    Inventory,
    Message,
    MonitorView,
    Placements,
    VmEvent,
    VmStart,
    VmStop,
)

# The largest legitimate message is an inventory: about 270 bytes per VM without an
# inline definition (measured with long names, labels and groups), so 512 KiB holds
# a host with ~1,900 VMs and stays well under NATS's default max_payload (1 MiB), so
# a dead letter that quotes the start of a large body still fits in one message.
MAX_MESSAGE_BYTES = 512 * 1024
# The deepest legitimate message nests 5 levels (inventory → vms → VmInfo → spec → list).
MAX_NESTING = 32
# What a dead letter keeps of the original body (and of its reason).
MAX_DEAD_LETTER_RAW = 64 * 1024
MAX_DEAD_LETTER_ERROR = 2048

_NAME_RE = re.compile(NAME_PATTERN)


class Violation(Exception):
    """The message breaks the seam: it must be dead-lettered with this reason."""


@dataclass(frozen=True, slots=True)
class Route:
    """One subject pattern (after the prefix) and what it carries.

    Tokens: a literal must be equal; ``{field}`` must equal the payload's field of
    that name; ``*`` is any name (the payload does not repeat it: an agent's
    command is addressed by subject alone)."""

    pattern: str
    types: tuple[type[Message], ...]
    literals: tuple[tuple[int, str], ...] = field(init=False)
    bound: tuple[tuple[int, str], ...] = field(init=False)
    names: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        tokens = self.pattern.split(".")
        literals, bound, names = [], [], []
        for i, token in enumerate(tokens):
            if token.startswith("{") and token.endswith("}"):
                attr = token[1:-1]
                for t in self.types:
                    if attr not in t.__struct_fields__:
                        raise TypeError(f"route {self.pattern}: {t.__name__} has no field {attr!r}")
                bound.append((i, attr))
            elif token == "*":
                names.append(i)
            else:
                literals.append((i, token))
        object.__setattr__(self, "literals", tuple(literals))
        object.__setattr__(self, "bound", tuple(bound))
        object.__setattr__(self, "names", tuple(names))

    @property
    def length(self) -> int:
        return self.pattern.count(".") + 1

    def matches(self, tokens: list[str]) -> bool:
        if len(tokens) != self.length:
            return False
        for i, literal in self.literals:
            if tokens[i] != literal:
                return False
        return True

    def allows(self) -> str:
        return " or ".join(t.__name__ for t in self.types)


# THE table (S5). Who may publish on each subject is NATS permissions' business
# (shared/natsconf.py); what may travel there is this table's.
ROUTES: tuple[Route, ...] = (
    Route("hb.{host}", (Heartbeat,)),
    Route("inventory.{host}", (Inventory,)),
    Route("host.{host}.{kind}", (HostEvent,)),
    Route("fence.request.{host}", (FenceRequest,)),
    Route("fence.result.{host}", (FenceResult,)),
    Route("vm.{vm}.{kind}", (VmEvent,)),
    Route("vm.placements.record.*", (Placements,)),
    Route("agent.*.cmd", (VmStart, VmStop)),
    Route("alert.{kind}", (Alert,)),
    Route("dlq.{service}", (DeadLetter,)),
    Route("view.{host}", (MonitorView,)),
)


def accepted_types(spec: Any) -> tuple[type[Message], ...]:
    """The message types a consumer accepts, from a decoder, a type, a union or a tuple of them."""
    if isinstance(spec, msgspec.json.Decoder):
        spec = spec.type
    if isinstance(spec, tuple | list):
        return tuple(t for s in spec for t in accepted_types(s))
    args = get_args(spec)
    if args:
        return tuple(t for a in args for t in accepted_types(a))
    if isinstance(spec, type) and issubclass(spec, Message):
        return (spec,)
    raise TypeError(f"a consumer accepts message types, not {spec!r}")


class _Tag(msgspec.Struct):
    """Only the tag: to name the type a rejected body claims to be."""

    type: str = ""


_TAG = msgspec.json.Decoder(_Tag)
_NAMES_BY_TAG = {t.__struct_config__.tag: t.__name__ for r in ROUTES for t in r.types}


class Routes:
    """The table under one subject prefix: lookup, checks and decoding by subject."""

    def __init__(self, prefix: str, routes: Iterable[Route] = ROUTES) -> None:
        self.prefix = prefix
        self._head = prefix + "."
        self._cut = len(self._head)
        # (first token, number of tokens) -> candidates: one or two, so a lookup is a dict hit.
        self._by_shape: dict[tuple[str, int], list[Route]] = {}
        for r in routes:
            self._by_shape.setdefault((r.pattern.split(".", 1)[0], r.length), []).append(r)
        self._decoders: dict[tuple[type[Message], ...], msgspec.json.Decoder[Any]] = {}
        self._narrowed: dict[tuple[str, tuple[type[Message], ...]], tuple[type[Message], ...]] = {}

    @classmethod
    @lru_cache(maxsize=16)
    def for_prefix(cls, prefix: str) -> Routes:
        return cls(prefix)

    def match(self, subject: str) -> tuple[Route, list[str]] | None:
        """The route of a subject and its tokens after the prefix, or None."""
        if not subject.startswith(self._head):
            return None
        tokens = subject[self._cut :].split(".")
        for r in self._by_shape.get((tokens[0], len(tokens)), ()):
            if r.matches(tokens):
                return r, tokens
        return None

    def check(self, subject: str, message: object) -> str | None:
        """Why ``message`` may not travel on ``subject``, or None if it may.

        Cheap enough for the heartbeat path (about a microsecond): one split, a dict
        hit, a type test and an attribute compare per bound token."""
        found = self.match(subject)
        if found is None:
            return f"no hafence message travels on {subject}"
        return _violation(found[0], found[1], subject, message)

    def _narrow(self, route: Route, accepts: tuple[type[Message], ...]) -> tuple[type[Message], ...]:
        key = (route.pattern, accepts)
        types = self._narrowed.get(key)
        if types is None:
            types = self._narrowed[key] = tuple(t for t in route.types if t in accepts)
        return types

    def decoder(self, types: tuple[type[Message], ...]) -> msgspec.json.Decoder[Any]:
        dec = self._decoders.get(types)
        if dec is None:
            target: Any = types[0]
            for t in types[1:]:
                target = target | t
            dec = self._decoders[types] = msgspec.json.Decoder(target)
        return dec

    def decode(self, subject: str, data: bytes, accepts: tuple[type[Message], ...] | None = None) -> Message:
        """The message ``data`` is on ``subject``, for a consumer that takes ``accepts``
        (None: anything the subject carries). Raises ``Violation`` with the reason."""
        check_body(data)
        found = self.match(subject)
        if found is None:
            raise Violation(f"no hafence message travels on {subject}")
        route, tokens = found
        types = route.types if accepts is None else self._narrow(route, accepts)
        if not types:
            raise Violation(f"{subject} carries {route.allows()}; this consumer accepts only "
                            f"{' or '.join(t.__name__ for t in accepts or ())}{_claimed(data)}")
        try:
            message = self.decoder(types).decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            # Keep "undecodable message: <msgspec's reason with its path>" first: it is what
            # an operator greps the dead letters for.
            raise Violation(f"undecodable message: {err}{_claimed(data, subject, route)}") from None
        except RecursionError:
            raise Violation(f"message nested too deeply to decode on {subject}") from None
        except Exception as err:  # whatever else a decoder may raise, the body is the problem
            raise Violation(f"undecodable message: {type(err).__name__}: {err}") from None
        reason = _violation(route, tokens, subject, message)
        if reason is not None:
            raise Violation(reason)
        return message


def _violation(route: Route, tokens: list[str], subject: str, message: object) -> str | None:
    if type(message) not in route.types:
        return f"a {type(message).__name__} on {subject}, which carries only {route.allows()}"
    for i, attr in route.bound:
        value = getattr(message, attr)
        if value != tokens[i]:
            return (f"a {type(message).__name__} with {attr} {value!r} on {subject} "
                    f"(the subject's {attr} is {tokens[i]!r})")
    for i in route.names:
        if not _NAME_RE.match(tokens[i]):
            return f"{subject}: token {tokens[i]!r} is not a valid name"
    return None


def _claimed(data: bytes, subject: str = "", route: Route | None = None) -> str:
    """Name the type the body claims to be (its tag), when that is not what the subject carries:
    ' (a FenceResult on ..., which carries only Inventory)'."""
    try:
        tag = _TAG.decode(data).type
    except Exception:
        return ""
    if not tag:
        return ""
    if route is None:
        return f" (the body claims to be a {_NAMES_BY_TAG.get(tag, repr(tag))})"
    if all(t.__struct_config__.tag != tag for t in route.types):
        return f" (a {_NAMES_BY_TAG.get(tag, repr(tag))} on {subject}, which carries only {route.allows()})"
    return ""


_SHAPE = bytes.maketrans(b"[]{}", b"()()")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STRUCTURE = re.compile(rb'\\.|[\[\]{}"]', re.DOTALL)


def check_body(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES, max_nesting: int = MAX_NESTING) -> None:
    """Refuse a body too large or nested too deeply, before any decoder sees it."""
    if len(data) > max_bytes:
        raise Violation(f"message of {len(data)} bytes is larger than the limit of {max_bytes}")
    if nesting_exceeds(data, max_nesting):
        raise Violation(f"message nested deeper than {max_nesting} levels")


def nesting_exceeds(data: bytes, limit: int = MAX_NESTING) -> bool:
    """Whether the JSON in ``data`` nests arrays/objects deeper than ``limit``.

    Cheap for what travels, in three steps:
    1. a body cannot nest deeper than it has opening brackets: two C-speed counts
       settle heartbeats and most messages;
    2. the brackets alone, reduced ``()`` by ``()`` (each round removes the deepest
       level): empty within ``limit`` rounds means no deeper (an inventory of 1,000
       VMs: a few passes of bytes.replace);
    3. otherwise (really deep, or brackets inside strings), walk the structure
       outside strings, stopping as soon as it is too deep.
    A body crafted to look shallow in step 2 with brackets in strings is still no
    danger: the decoder's RecursionError is caught and dead-lettered too."""
    if len(data) <= limit or data.count(b"[") + data.count(b"{") <= limit:
        return False
    shape = data.translate(_SHAPE, _NOT_BRACKETS)
    for _ in range(limit):
        reduced = shape.replace(b"()", b"")
        if not reduced:
            return False
        if len(reduced) * 10 > len(shape) * 9:
            break  # narrow and deep, or unbalanced (brackets inside strings): walk it
        shape = reduced
    depth = 0
    in_string = False
    for match in _STRUCTURE.finditer(data):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
