"""API keys on the HTTP doors, with FastAPI's security utilities: a key is sent as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, and both schemes are declared in the OpenAPI schema
(so /docs has its Authorize button).

``require_key`` is a dependency of every route of the app. The probes and the page's own files stay open
(``is_open``): a platform's health checks carry no key, and the page must load before it can ask its user
for one. A missing or unknown key is an Unauthorized error, which the door owning the path answers in its
own format with a 401 and ``WWW-Authenticate`` (service/web/doors.py); its words are
``ApiKeys.check``'s, which the gRPC door says too. The key itself is never logged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.core.api_keys import API_KEY_HEADER, ApiKeys
from service.web.health import PROBE_PATHS

# RFC 6750's challenge; the realm names the server, as Triton's and TorchServe's answers do theirs.
WWW_AUTHENTICATE = 'Bearer realm="maskrcnn-service"'
# What needs no key: liveness and readiness (ours and the protocol's), and the page with its static files.
OPEN_PATHS = frozenset({*PROBE_PATHS, "/"})
OPEN_PREFIXES = ("/static/",)

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The API key")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def key_dependency(keys: ApiKeys) -> Callable[..., Awaitable[None]]:
    """The dependency that lets a request through only with one of ``keys`` (or to an open path)."""

    async def require_key(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        api_key: Annotated[str | None, Security(api_key_header)],
    ) -> None:
        if is_open(request.url.path):
            return
        keys.check(credentials.credentials if credentials is not None else api_key)

    return require_key
