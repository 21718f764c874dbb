"""Who may call the server: the API keys of ``MRCNN_API_KEYS`` and ``MRCNN_API_KEYS_FILE``.

Framework-free, so that every front door asks the same question, ``keys.check(token)`` (``keys.allows(token)``
with the refusal every door says alike): the HTTP doors through FastAPI's security utilities
(service/web/auth.py), the gRPC door from its call's metadata (service/grpc/auth.py). A key is sent as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (gRPC metadata: the same names, in lower case).

Keys are held as SHA-256 digests only, whether given in clear or hashed (a file line ``sha256:<hex>``, as
``printf %s "$KEY" | sha256sum`` prints it), so the process never keeps a key it could leak. A presented
token is hashed and compared with every digest by ``hmac.compare_digest``, without stopping at a match:
the time taken says nothing about which key, or how much of one, matched. API keys are long random
strings (``python -c 'import secrets; print(secrets.token_urlsafe(32))'``), so a plain hash is enough; a
slow password hash would only slow every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from service.core.errors import Unauthorized
from service.core.settings import Settings

API_KEY_HEADER = "X-API-Key"
# The refusals, the same words on every door (HTTP's 401s, gRPC's UNAUTHENTICATED).
MISSING_KEY_MESSAGE = f"an API key is required: send it as 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'"
INVALID_KEY_MESSAGE = "the API key is not valid"
HASHED_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


class ApiKeysError(ValueError):
    """The keys file cannot be read, has no key, or has a ``sha256:`` line that is not a digest."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """A set of accepted keys, held as digests."""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self._digests = tuple(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def allows(self, token: str | None) -> bool:
        """Whether ``token`` (the key a client presented; None or "" when it sent none) is one of the keys."""
        if not token:
            return False
        presented = digest(token)
        found = False
        for known in self._digests:  # no early exit: every request costs the same
            found |= hmac.compare_digest(presented, known)
        return found

    def check(self, token: str | None) -> None:
        """Let ``token`` through if it is one of the keys; otherwise Unauthorized (``missing_api_key`` when none
        was sent, ``invalid_api_key`` when it is not a key). The token is never part of the error."""
        if token is None:
            raise Unauthorized("missing_api_key", MISSING_KEY_MESSAGE)
        if not self.allows(token):
            raise Unauthorized("invalid_api_key", INVALID_KEY_MESSAGE)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys | None:
        """The keys of ``settings`` (the variable's and the file's together), or None when there are none:
        the server is open."""
        digests = [digest(k.get_secret_value()) for k in settings.api_keys]
        if settings.api_keys_file is not None:
            digests += read_keys_file(settings.api_keys_file)
        return cls(digests) if digests else None


def read_keys_file(path: Path) -> list[bytes]:
    """The digests of a keys file: one key a line, plain or ``sha256:<64 hex digits>``; blank lines and
    ``#`` comments skipped. An unreadable or empty file is an ApiKeysError, so the server refuses to start
    rather than start open."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeysError(f"cannot read the API keys file {path}: {exc}") from None
    digests = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(HASHED_PREFIX):
            hexdigest = line[len(HASHED_PREFIX):]
            if not _HEX_DIGEST.fullmatch(hexdigest):  # the line itself is not repeated: it may be a key
                raise ApiKeysError(f"{path}:{number}: after {HASHED_PREFIX} come the 64 hex digits of a SHA-256")
            digests.append(bytes.fromhex(hexdigest))
        else:
            digests.append(digest(line))
    if not digests:  # meant to close the server: starting open would be the wrong way to fail
        raise ApiKeysError(f"the API keys file {path} has no keys")
    return digests
