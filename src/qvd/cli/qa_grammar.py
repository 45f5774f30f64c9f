"""The grammar of the ``qa`` admin CLI: a tokenizer and a recursive-descent parser.

::

    qa [options] <object> [<filters>] <verb> [<arguments-or-fields>] [order [asc|desc] f1, f2]

    command     := object [filter] verb [verb-args] [order]
    filter      := and-filter (';' and-filter)*          ';' = OR
    and-filter  := not-filter (',' not-filter)*          ',' = AND
    not-filter  := '!' not-filter | '(' filter ')' | condition | bare-value
    condition   := field op value                        op: = != < > <= >= ~
    value       := scalar | '[' scalar (',' scalar)* ']' | '[' scalar ':' scalar ']'
    bare-value  := scalar | list                         name= (di: id= or version=, config: key=)
    verb-args   := assignment ([','] assignment)*        new, set, prop
                 | name ([','] name)*                    get (fields), tag, untag, unprop
                 | 'enable' | 'disable'                  totp (user)
    order       := 'order' ['asc' | 'desc'] field ([','] field)*

Commas between verb arguments are optional, so the shell-friendly ``new name=a password=b``
and the qa4-style ``new name=a, password=b`` both parse.

The result is a :class:`Command` whose ``filters`` is the JSON filter tree of the admin
API (``docs/api.md``).  Field aliases are resolved here, and each scalar is typed here.
A quoted value is always a string.  An unquoted number becomes a JSON number, unless the
field holds strings (``version=1.10`` must not turn into ``1.1``).

This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

OBJECTS: tuple[str, ...] = (
    "vm", "user", "host", "osf", "di", "tenant", "admin", "role", "acl", "config", "audit",
)
OBJECT_ALIASES: dict[str, str] = {"log": "audit", "administrator": "admin"}

_BLOCKABLE = frozenset({"user", "vm", "host", "di", "tenant", "admin"})
_WITH_PROPERTIES = frozenset({"user", "vm", "host", "osf", "di"})
_READ_ONLY = frozenset({"acl", "audit"})

# Verbs whose arguments are k=v assignments, and verbs whose arguments are plain names.
ASSIGNMENT_VERBS = frozenset({"new", "set", "prop"})
NAME_VERBS = frozenset({"get", "tag", "untag", "unprop"})
# Verbs that act on objects that already exist: the CLI resolves the filter to ids first.
ACTION_VERBS = frozenset({
    "set", "del", "block", "unblock", "start", "stop", "disconnect", "stop_vms",
    "tag", "untag", "prop", "unprop", "default", "totp", "unlock",
})
#: ``user ... totp enable|disable``
TOTP_MODES = ("enable", "disable")

FILTER_ALIASES: dict[str, dict[str, str]] = {
    "vm": {"user": "user_name", "osf": "osf_name", "tag": "di_tag", "host": "host_name", "di": "di_version"},
    "di": {"osf": "osf_name", "name": "disk_image"},
    "host": {"ip_address": "address"},
}
# The API takes names under ``user``/``osf`` on create, so the read-side names map back to them.
NEW_ALIASES: dict[str, dict[str, str]] = {
    "vm": {"user_name": "user", "osf_name": "osf", "tag": "di_tag"},
    "di": {"osf_name": "osf", "name": "disk_image", "file": "disk_image"},
    "host": {"ip_address": "address"},
}
SET_ALIASES: dict[str, dict[str, str]] = {
    "vm": {"tag": "di_tag"},
    "host": {"ip_address": "address"},
}

# Fields whose values are strings even when they look like numbers (names, versions, passwords).
STRING_FIELDS = frozenset({
    "name", "password", "description", "version", "disk_image", "address", "key", "value", "default",
    "ip", "mac", "tenant", "user", "osf", "user_name", "osf_name", "host_name", "di_tag", "di_version",
    "tag", "tags", "state", "user_state", "roles", "acls", "inherits", "login", "admin_name", "action",
    "object_type", "object_name", "message", "source", "at", "sha256", "expiration_soft",
    "expiration_hard", "vm_cmd", "last_error", "created_at", "frontend_address",
})

_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_INT_RE = re.compile(r"-?(0|[1-9][0-9]*)\Z")
_FLOAT_RE = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+\Z")
_OPERATORS = ("<=", ">=", "!=", "=", "<", ">", "~")
# Characters that always end a word; ':' ends one only inside brackets, so that
# times such as expiration_hard=2030-01-01T10:00 need no quotes.
_SPECIAL = frozenset("=!<>~,;()[]'\"")


def verbs_for(obj: str) -> tuple[str, ...]:
    """The verbs an object accepts, in the order help and error messages list them."""
    if obj == "config":
        return ("get", "set", "default", "del")
    if obj in _READ_ONLY:
        return ("get",)
    verbs = ["get", "new", "set", "del"]
    if obj in _BLOCKABLE:
        verbs += ["block", "unblock"]
    if obj == "vm":
        verbs += ["start", "stop", "disconnect"]
    elif obj == "host":
        verbs += ["stop", "stop_vms"]
    elif obj == "di":
        verbs += ["tag", "untag"]
    if obj in _WITH_PROPERTIES:
        verbs += ["prop", "unprop"]
    if obj == "user":
        verbs += ["totp", "unlock"]
    return tuple(verbs)


class TokenKind(Enum):
    WORD = "word"
    STRING = "quoted string"
    OP = "operator"
    COMMA = "','"
    SEMI = "';'"
    BANG = "'!'"
    LPAREN = "'('"
    RPAREN = "')'"
    LBRACKET = "'['"
    RBRACKET = "']'"
    COLON = "':'"
    END = "end of command"


_PUNCTUATION = {
    ",": TokenKind.COMMA, ";": TokenKind.SEMI, "(": TokenKind.LPAREN, ")": TokenKind.RPAREN,
    "[": TokenKind.LBRACKET, "]": TokenKind.RBRACKET,
}


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    value: str
    """The word, operator or punctuation; for a quoted string, its content without quotes."""
    text: str
    """As written (with quotes), for error messages."""
    arg: int
    """Index of the command-line argument the token came from."""
    offset: int


class GrammarError(Exception):
    """A command that does not fit the grammar; ``str()`` points at the offending token."""

    def __init__(self, message: str, token: Token | None = None) -> None:
        if token is None:
            full = f"syntax error: {message}"
        elif token.kind is TokenKind.END:
            full = f"syntax error at end of command: {message}"
        else:
            full = f"syntax error at '{token.text}': {message}"
        super().__init__(full)
        self.message = full
        self.token = token


@dataclass(frozen=True)
class Command:
    """One parsed ``qa`` command.

    ``filters`` is the API's JSON filter tree (``{}`` = no filter).  ``args`` depends on the
    verb: field values for ``new``/``set``, property values for ``prop``, config values by
    key for ``config set`` (plus ``tenant``), ``{"tags": [...]}`` for ``tag``/``untag``,
    ``{"keys": [...]}`` for ``unprop``.  ``fields`` are the columns asked for by ``get``.
    ``order`` is the API's ``order_by`` list, ``-`` marking descending.
    """

    obj: str
    filters: dict[str, Any]
    verb: str
    args: dict[str, Any] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)


def tokenize(argv: Sequence[str]) -> list[Token]:
    """Split the command-line arguments into tokens.

    Each argument is tokenized on its own (the boundary between two arguments separates
    tokens, as a space does), so ``["vm", "user_name~%ali%"]`` and ``["vm user_name~'%ali%'"]``
    give the same tokens.  Quotes the shell already removed are gone: a value with spaces
    has to be quoted for qa too (``"description='my desk'"``).
    """
    tokens: list[Token] = []
    depth = 0
    for arg_index, arg in enumerate(argv):
        i = 0
        n = len(arg)
        while i < n:
            ch = arg[i]
            if ch.isspace():
                i += 1
                continue
            start = i
            if ch in "'\"":
                value, i = _read_quoted(arg, i, arg_index)
                tokens.append(Token(TokenKind.STRING, value, arg[start:i], arg_index, start))
                continue
            op = next((o for o in _OPERATORS if arg.startswith(o, i)), None)
            if op is not None:
                tokens.append(Token(TokenKind.OP, op, op, arg_index, start))
                i += len(op)
                continue
            if ch == "!":
                tokens.append(Token(TokenKind.BANG, ch, ch, arg_index, start))
                i += 1
                continue
            if ch in _PUNCTUATION:
                kind = _PUNCTUATION[ch]
                if kind is TokenKind.LBRACKET:
                    depth += 1
                elif kind is TokenKind.RBRACKET:
                    depth = max(0, depth - 1)
                tokens.append(Token(kind, ch, ch, arg_index, start))
                i += 1
                continue
            if ch == ":" and depth > 0:
                tokens.append(Token(TokenKind.COLON, ch, ch, arg_index, start))
                i += 1
                continue
            while i < n and not _ends_word(arg[i], depth):
                i += 1
            word = arg[start:i]
            tokens.append(Token(TokenKind.WORD, word, word, arg_index, start))
    end_arg = max(len(argv) - 1, 0)
    end_offset = len(argv[-1]) if argv else 0
    tokens.append(Token(TokenKind.END, "", "", end_arg, end_offset))
    return tokens


def _ends_word(ch: str, depth: int) -> bool:
    return ch.isspace() or ch in _SPECIAL or (ch == ":" and depth > 0)


def _read_quoted(arg: str, start: int, arg_index: int) -> tuple[str, int]:
    """Read a '...' or "..." string starting at ``start``; a backslash escapes the next character."""
    quote = arg[start]
    out: list[str] = []
    i = start + 1
    while i < len(arg):
        ch = arg[i]
        if ch == "\\" and i + 1 < len(arg):
            out.append(arg[i + 1])
            i += 2
            continue
        if ch == quote:
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    bad = Token(TokenKind.STRING, arg[start:], arg[start:], arg_index, start)
    raise GrammarError(f"unterminated {quote} quote", bad)


def parse(argv: Sequence[str]) -> Command:
    """Parse the command-line arguments after the options (``["vm", "desk1", "get"]``)."""
    return _Parser(tokenize(argv)).command()


def parse_line(line: str) -> Command:
    """Parse a whole command written as one string (``"vm desk1 get"``)."""
    return parse([line])


_ALL_VERBS = frozenset(v for o in OBJECTS for v in verbs_for(o))


def _verb_list(obj: str) -> str:
    return ", ".join(verbs_for(obj))


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    # --- token helpers -------------------------------------------------------------------------

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        tok = self.peek()
        if tok.kind is not TokenKind.END:
            self.pos += 1
        return tok

    def at(self, kind: TokenKind) -> bool:
        return self.peek().kind is kind

    def at_word(self, *words: str) -> bool:
        tok = self.peek()
        return tok.kind is TokenKind.WORD and tok.value.lower() in words

    def at_verb(self, obj: str) -> bool:
        """A known verb that is not the field of a condition (``state=...`` vs ``stop``)."""
        return self.at_word(*verbs_for(obj)) and self.peek(1).kind is not TokenKind.OP

    def error(self, message: str, tok: Token | None = None) -> GrammarError:
        return GrammarError(message, self.peek() if tok is None else tok)

    # --- command -------------------------------------------------------------------------------

    def command(self) -> Command:
        obj = self.object()
        filters: dict[str, Any] = {}
        filter_tok = self.peek()
        if not self.at_verb(obj):
            if self.at(TokenKind.END):
                raise self.error(f"expected a filter or a verb ({_verb_list(obj)})")
            filters = self.or_filter(obj)
        if not self.at_verb(obj):
            raise self.error(f"expected a verb ({_verb_list(obj)})")
        verb_tok = self.advance()
        verb = verb_tok.value.lower()
        if verb == "new" and filters:
            raise self.error("'new' takes no filter; give the fields after it: new name=..., ...", filter_tok)
        args: dict[str, Any] = {}
        fields: list[str] = []
        if verb == "get":
            fields = [self.alias(obj, f, FILTER_ALIASES) for f in self.names("a field", required=False)]
        elif obj == "config" and verb == "set":
            args = self.config_assignments(bool(filters), verb_tok)
        elif verb in ASSIGNMENT_VERBS:
            args = self.assignments(obj, verb, verb_tok)
        elif verb in ("tag", "untag"):
            args = {"tags": self.names("a tag", required=True, quoted_ok=True)}
        elif verb == "unprop":
            args = {"keys": self.names("a property key", required=True, quoted_ok=True)}
        elif verb == "totp":
            mode_tok = self.peek()
            if not self.at_word(*TOTP_MODES):
                raise self.error(f"expected {' or '.join(TOTP_MODES)} after 'totp'", mode_tok)
            args = {"totp": self.advance().value.lower()}
        order: list[str] = []
        if self.at_word("order"):
            if verb != "get":
                raise self.error("'order' only goes after 'get'")
            order = self.order(obj)
        if not self.at(TokenKind.END):
            if verb in ASSIGNMENT_VERBS or (obj == "config" and verb == "set"):
                raise self.error("expected ',' and another key=value")
            if verb in NAME_VERBS:
                raise self.error("expected ',' and another name, or 'order'")
            raise self.error(f"'{verb}' takes no arguments")
        return Command(obj=obj, filters=filters, verb=verb, args=args, fields=fields, order=order)

    def object(self) -> str:
        tok = self.peek()
        name = tok.value.lower() if tok.kind is TokenKind.WORD else ""
        name = OBJECT_ALIASES.get(name, name)
        if name not in OBJECTS:
            raise self.error(f"expected an object ({', '.join(OBJECTS)})")
        self.advance()
        return name

    # --- filters -------------------------------------------------------------------------------

    def or_filter(self, obj: str) -> dict[str, Any]:
        parts = [self.and_filter(obj)]
        while self.at(TokenKind.SEMI):
            self.advance()
            parts.append(self.and_filter(obj))
        return _combine("-or", parts)

    def and_filter(self, obj: str) -> dict[str, Any]:
        parts = [self.not_filter(obj)]
        while self.at(TokenKind.COMMA):
            self.advance()
            parts.append(self.not_filter(obj))
        return _combine("-and", parts)

    def not_filter(self, obj: str) -> dict[str, Any]:
        if self.at(TokenKind.BANG):
            self.advance()
            return {"-not": self.not_filter(obj)}
        if self.at(TokenKind.LPAREN):
            self.advance()
            inner = self.or_filter(obj)
            if not self.at(TokenKind.RPAREN):
                raise self.error("expected ')' or another condition after ',' or ';'")
            self.advance()
            return inner
        tok = self.peek()
        if tok.kind is TokenKind.WORD and self.peek(1).kind is TokenKind.OP:
            return self.condition(obj)
        if self.at_verb(obj) and self.pos > 0 and self.tokens[self.pos - 1].kind in (
            TokenKind.COMMA, TokenKind.SEMI, TokenKind.BANG,
        ):
            raise self.error(f"expected a condition after '{self.tokens[self.pos - 1].text}', found a verb")
        if tok.kind in (TokenKind.WORD, TokenKind.STRING, TokenKind.LBRACKET):
            return self.bare_value(obj)
        raise self.error("expected a condition (field=value), a name, '!' or '('")

    def condition(self, obj: str) -> dict[str, Any]:
        name = self.field_name(obj, FILTER_ALIASES)
        op_tok = self.advance()
        op = op_tok.value
        if self.at(TokenKind.LBRACKET):
            values, is_range = self.bracket(name)
            if op not in ("=", "!="):
                raise self.error(f"operator '{op}' takes a single value, not a list or range", op_tok)
            node: dict[str, Any] = {name: {"between": values} if is_range else values}
            return {"-not": node} if op == "!=" else node
        value = self.scalar(name, f"expected a value after '{name}{op}'")
        if op == "=":
            return {name: value}
        return {name: {op: value}}

    def bare_value(self, obj: str) -> dict[str, Any]:
        """A value with no field: the object's natural key (``qa vm desk1 get``)."""
        if self.at(TokenKind.LBRACKET):
            values, is_range = self.bracket("name", raw=True)
            key = _bare_key(obj, values)
            typed = [_bare_typed(key, v) for v in values]
            return {key: {"between": typed} if is_range else typed}
        tok = self.advance()
        raw = tok.value
        follows = self.peek().kind
        if (
            tok.kind is TokenKind.WORD and raw.lower() in _ALL_VERBS and not self.at_verb(obj)
            and follows not in (TokenKind.COMMA, TokenKind.SEMI, TokenKind.RPAREN)
        ):
            # Not a name after all: a verb this object does not have (``audit new ...``).
            raise GrammarError(f"'{raw}' is not a verb of {obj}; expected a verb ({_verb_list(obj)})", tok)
        key = _bare_key(obj, [raw])
        return {key: _bare_typed(key, raw)}

    def bracket(self, name: str, *, raw: bool = False) -> tuple[list[Any], bool]:
        """``[a, b, c]`` (a list) or ``[a:b]`` (a range); returns (values, is_range)."""
        self.advance()
        if self.at(TokenKind.RBRACKET):
            raise self.error("expected a value: an empty list matches nothing")
        first = self.scalar(name, "expected a value in the list", raw=raw)
        if self.at(TokenKind.COLON):
            self.advance()
            last = self.scalar(name, "expected the upper bound of the range", raw=raw)
            if not self.at(TokenKind.RBRACKET):
                raise self.error("expected ']' to close the range")
            self.advance()
            return [first, last], True
        values = [first]
        while self.at(TokenKind.COMMA):
            self.advance()
            values.append(self.scalar(name, "expected a value in the list", raw=raw))
        if not self.at(TokenKind.RBRACKET):
            raise self.error("expected ',' or ']' in the list")
        self.advance()
        return values, False

    def scalar(self, name: str, message: str, *, raw: bool = False) -> Any:
        tok = self.peek()
        if tok.kind is TokenKind.STRING:
            self.advance()
            return tok.value
        if tok.kind is TokenKind.WORD:
            self.advance()
            return tok.value if raw else _typed(name, tok.value)
        raise self.error(message)

    def field_name(self, obj: str, aliases: dict[str, dict[str, str]]) -> str:
        tok = self.peek()
        if tok.kind is not TokenKind.WORD or not _FIELD_RE.match(tok.value):
            raise self.error("expected a field name")
        self.advance()
        return self.alias(obj, tok.value, aliases)

    @staticmethod
    def alias(obj: str, name: str, aliases: dict[str, dict[str, str]]) -> str:
        return aliases.get(obj, {}).get(name, name)

    # --- verb arguments ------------------------------------------------------------------------

    def assignments(self, obj: str, verb: str, verb_tok: Token) -> dict[str, Any]:
        """``k=v[, k2=v2 ...]`` after new/set/prop."""
        # Property keys are free-form, so no alias may rewrite them.
        aliases = {"new": NEW_ALIASES, "set": SET_ALIASES}.get(verb, {})
        out: dict[str, Any] = {}
        for name, value in self.pairs(obj, aliases, verb_tok, raw=verb == "prop"):
            if verb == "prop" and isinstance(value, list):
                raise self.error(f"a property value is a single string; quote it: {name}='...'")
            out[name] = value
        return out

    def config_assignments(self, filtered: bool, verb_tok: Token) -> dict[str, Any]:
        """``config set k=v, ...`` (keys are config keys) or, after a filter, ``set value=v``.

        qa4's ``config set key=K, value=V`` is also understood.
        """
        out: dict[str, Any] = {}
        for name, value in self.pairs("config", {}, verb_tok, raw=True):
            if isinstance(value, list):
                raise self.error(f"a config value is a single string; quote values with commas: {name}='a,b'")
            out[name] = value
        if "key" in out and "value" in out:
            tenant = out.pop("tenant", None)
            key = out.pop("key")
            value = out.pop("value")
            if out:
                raise GrammarError(f"unexpected {', '.join(out)} after key=..., value=...", verb_tok)
            out = {key: value}
            if tenant is not None:
                out["tenant"] = tenant
        if filtered and set(out) - {"value", "tenant"}:
            raise GrammarError(
                "after a filter, config set takes only value=... (and tenant=...); "
                "without a filter give the keys: config set some.key=value", verb_tok)
        if filtered and "value" not in out:
            raise GrammarError("expected value=... after set", verb_tok)
        if not set(out) - {"tenant"}:
            raise GrammarError("expected key=value after set", verb_tok)
        return out

    def pairs(
        self, obj: str, aliases: dict[str, dict[str, str]], verb_tok: Token, *, raw: bool,
    ) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        seen: set[str] = set()
        if not self.at(TokenKind.WORD):
            raise self.error(f"expected key=value after '{verb_tok.value}'")
        while True:
            key_tok = self.peek()
            name = self.field_name(obj, aliases)
            if not self.at(TokenKind.OP):
                raise self.error(f"expected '=' after '{key_tok.value}'")
            if self.peek().value != "=":
                raise self.error("only '=' assigns a value here")
            self.advance()
            value: Any
            if self.at(TokenKind.LBRACKET):
                values, is_range = self.bracket(name, raw=raw)
                if is_range:
                    raise self.error("a range only makes sense in a filter", key_tok)
                value = values
            else:
                value = self.scalar(name, f"expected a value after '{key_tok.value}='", raw=raw)
            if name in seen:
                raise GrammarError(f"'{name}' is given twice", key_tok)
            seen.add(name)
            out.append((name, value))
            if self.at(TokenKind.COMMA):
                self.advance()
                if self.at(TokenKind.END):
                    break
                continue
            # The comma between two k=v is optional; 'order' ends the list so that the
            # command can say where it misplaced it.
            if self.at(TokenKind.WORD) and not self.at_word("order"):
                continue
            break
        return out

    def names(self, what: str, *, required: bool, quoted_ok: bool = False) -> list[str]:
        kinds = (TokenKind.WORD, TokenKind.STRING) if quoted_ok else (TokenKind.WORD,)
        out: list[str] = []
        while self.peek().kind in kinds and not self.at_word("order"):
            tok = self.advance()
            if not quoted_ok and not _FIELD_RE.match(tok.value):
                raise self.error(f"expected {what}", tok)
            out.append(tok.value)
            if self.at(TokenKind.COMMA):
                self.advance()
                # A trailing comma is harmless, as after k=v arguments.
                if self.peek().kind not in kinds and not self.at(TokenKind.END) and not self.at_word("order"):
                    raise self.error(f"expected {what} after ','")
        if required and not out:
            raise self.error(f"expected {what}")
        return out

    def order(self, obj: str) -> list[str]:
        self.advance()
        prefix = ""
        if self.at_word("asc", "desc"):
            prefix = "-" if self.advance().value.lower() == "desc" else ""
        out: list[str] = []
        while self.at(TokenKind.WORD):
            if self.at_word("asc", "desc"):
                raise self.error("asc/desc goes right after 'order': order desc f1, f2")
            out.append(prefix + self.field_name(obj, FILTER_ALIASES))
            if self.at(TokenKind.COMMA):
                self.advance()
                if not self.at(TokenKind.WORD):
                    raise self.error("expected a field after ','")
        if not out:
            raise self.error("expected a field to order by")
        return out


def _combine(op: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join AND/OR operands, flattening nested ones of the same kind.

    Plain conditions on distinct fields AND-ed together become one object (the API ANDs
    the keys of an object), which keeps the common case ``{"state": ..., "name": ...}``.
    """
    if len(parts) == 1:
        return parts[0]
    flat: list[dict[str, Any]] = []
    for part in parts:
        if list(part) == [op]:
            flat.extend(part[op])
        else:
            flat.append(part)
    if op == "-and":
        merged: dict[str, Any] = {}
        if all(not k.startswith("-") for p in flat for k in p) and sum(len(p) for p in flat) == len(
            {k for p in flat for k in p}
        ):
            for p in flat:
                merged.update(p)
            return merged
    return {op: flat}


def _bare_key(obj: str, values: list[Any]) -> str:
    if obj == "config":
        return "key"
    if obj == "di":
        return "id" if all(_INT_RE.match(str(v)) for v in values) else "version"
    return "name"


def _bare_typed(key: str, value: Any) -> Any:
    return int(value) if key == "id" else str(value)


def _typed(name: str, raw: str) -> Any:
    """The JSON value of an unquoted word given for field ``name``."""
    if raw == "null":
        return None
    if name in STRING_FIELDS:
        return raw
    if _INT_RE.match(raw):
        return int(raw)
    if _FLOAT_RE.match(raw):
        return float(raw)
    if raw in ("true", "false"):
        return raw == "true"
    return raw
