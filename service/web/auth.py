"""API keys on the HTTP doors, with FastAPI's security utilities: a key is sent as
``Authorization: Bearer <key>``, ``X-API-Key: <key>``, or as the password of HTTP Basic auth (any user name:
``Authorization: Basic base64(user:key)``, the one way Label Studio can authenticate to an ML backend), and
the three schemes are declared in the OpenAPI schema (so /docs has its Authorize button). The rule is the same
on every route; only the challenge of a 401 differs: ``WWW-Authenticate`` lists Basic on /label-studio alone
(``LABEL_STUDIO_WWW_AUTHENTICATE``), so that a browser calling the other routes (the page) never pops up its
own login dialog.

``require_key`` is a dependency of every route of the app. The probes and the page's own files stay open
(``is_open``): a platform's health checks carry no key, and the page must load before it can ask its user
for one. A missing or unknown key is an Unauthorized error, which the door owning the path answers in its
own format with a 401 and ``WWW-Authenticate`` (service/web/doors.py); its words are
``ApiKeys.check``'s, which the gRPC door says too. The key itself is never logged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

from service.core.api_keys import API_KEY_HEADER, ApiKeys
from service.core.errors import Unauthorized
from service.web.health import PROBE_PATHS

# RFC 6750's challenge; the realm names the server, as Triton's and TorchServe's answers do theirs.
WWW_AUTHENTICATE = 'Bearer realm="maskrcnn-service"'
# Label Studio's ML backend connection sends HTTP Basic auth only: its routes offer that scheme too (RFC 7617).
LABEL_STUDIO_WWW_AUTHENTICATE = f'{WWW_AUTHENTICATE}, Basic realm="maskrcnn-service", charset="UTF-8"'
# What needs no key: liveness and readiness (ours and the protocol's), and the page with its static files.
OPEN_PATHS = frozenset({*PROBE_PATHS, "/"})
OPEN_PREFIXES = ("/static/",)

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


class LenientBasic(HTTPBasic):
    """FastAPI's HTTPBasic, but a malformed ``Authorization: Basic`` header reads as no credentials instead of
    the framework's own 401: the probes stay open whatever the header, and a refusal is ours (its code, its
    door's body)."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        try:
            return await super().__call__(request)
        except HTTPException:
            return None


basic = LenientBasic(scheme_name="HTTPBasic", auto_error=False, realm="maskrcnn-service",
                     description="HTTP Basic auth: any user name, the API key as the password (Label Studio)")
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The API key")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def key_dependency(keys: ApiKeys) -> Callable[..., Awaitable[None]]:
    """The dependency that lets a request through only with one of ``keys`` (or to an open path)."""

    async def require_key(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        basic_credentials: Annotated[HTTPBasicCredentials | None, Security(basic)],
        api_key: Annotated[str | None, Security(api_key_header)],
    ) -> None:
        if is_open(request.url.path):
            return
        token = token_of(credentials, basic_credentials, api_key)
        if token is None and "authorization" in request.headers:  # a scheme we do not read, or malformed Basic
            raise Unauthorized("invalid_api_key", "the Authorization header carries no API key: send "
                               "'Bearer <key>', or Basic auth with the key as the password")
        keys.check(token)

    return require_key


def token_of(
    bearer_credentials: HTTPAuthorizationCredentials | None, basic_credentials: HTTPBasicCredentials | None,
    api_key: str | None,
) -> str | None:
    """The key a request presents: its bearer token, else its Basic auth password (whatever the user name),
    else its X-API-Key header; None when it presents none."""
    if bearer_credentials is not None:
        return bearer_credentials.credentials
    if basic_credentials is not None:
        return basic_credentials.password
    return api_key
