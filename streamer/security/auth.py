"""Tokens and roles: who may call which route.

Roles nest: admin > operator > viewer. `publisher` stands apart (it may only
push WHIP streams). viewer and publisher tokens may be limited to stream ids.
Tokens are kept as SHA-256 digests and compared in constant time; a token
never appears in a log line or an error.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Role", "ROLES", "TokenEntry", "Principal", "Authenticator", "parse_token_spec", "tokens_from_env", "AuthError"]

Role = Literal["viewer", "publisher", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "publisher", "operator", "admin")
_RANK = {"viewer": 1, "operator": 2, "admin": 3}  # publisher is outside the chain
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MIN_TOKEN_LENGTH = 16  # short tokens can be guessed over the network


class AuthError(ValueError):
    """A token entry that cannot be used (bad role, short token, bad digest)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class TokenEntry:
    role: Role
    digest: bytes  # SHA-256 of the token
    streams: frozenset[str] | None = None  # None: every stream

    @classmethod
    def make(cls, role: str, *, token: str | None = None, sha256: str | None = None,
             streams: Iterable[str] | None = None) -> TokenEntry:
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if (token is None) == (sha256 is None):
            raise AuthError("a token entry needs exactly one of 'token' or 'sha256'")
        if token is not None:
            if len(token) < MIN_TOKEN_LENGTH:
                raise AuthError(f"a {role} token is shorter than {MIN_TOKEN_LENGTH} characters")
            digest = _digest(token)
        else:
            assert sha256 is not None  # exactly one of the two, checked above
            if not _SHA256.match(sha256.lower()):
                raise AuthError("sha256 must be 64 hex digits (sha256sum of the token)")
            digest = bytes.fromhex(sha256)
        ids = frozenset(streams) if streams is not None else None
        if ids is not None and role in ("operator", "admin"):
            raise AuthError(f"{role} tokens cover every stream; stream ids are for viewer and publisher tokens")
        return cls(role, digest, ids)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a role and the streams it covers (None: all)."""

    role: Role
    streams: frozenset[str] | None = None

    def has(self, needed: Role) -> bool:
        if needed == "publisher":
            return self.role in ("publisher", "admin")
        return self.role != "publisher" and _RANK[self.role] >= _RANK[needed]

    def covers(self, stream_id: str) -> bool:
        return self.streams is None or stream_id in self.streams

    def visible(self, stream_ids: Iterable[str]) -> list[str]:
        return [s for s in stream_ids if self.covers(s)]


OPEN = Principal("admin")  # no tokens configured, loopback only


class Authenticator:
    """Token -> Principal. Every entry is compared (no early exit), in constant time."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = tuple(entries)

    @property
    def open(self) -> bool:
        return not self.entries

    def identify(self, token: str | None, *, from_query: bool = False) -> Principal | None:
        """The principal for `token`, or None. A query-string token never grants more than viewer
        (it ends up in browser history and proxy logs)."""
        if self.open:
            return OPEN
        if not token:
            return None
        digest = _digest(token)
        found: TokenEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            return None
        if from_query:
            if found.role == "publisher":
                return None
            return Principal("viewer", found.streams)
        return Principal(found.role, found.streams)


def parse_token_spec(spec: str) -> TokenEntry:
    """`ROLE[:id,id]=TOKEN` (from --token and STREAMER_TOKENS)."""
    head, sep, token = spec.partition("=")
    if not sep or not token:
        raise AuthError("expected ROLE[:id,id]=TOKEN")
    role, _, ids = head.strip().partition(":")
    streams = [s.strip() for s in ids.split(",") if s.strip()] if ids else None
    return TokenEntry.make(role.strip(), token=token.strip(), streams=streams)


def tokens_from_env(environ=os.environ) -> list[TokenEntry]:
    """STREAMER_TOKENS: the --token entries, separated by ';'."""
    value = environ.get("STREAMER_TOKENS", "")
    return [parse_token_spec(part) for part in value.split(";") if part.strip()]
