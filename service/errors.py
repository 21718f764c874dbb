"""The one error type of a request: every front door answers it in its own protocol's error body."""

from __future__ import annotations


class ApiError(Exception):
    """A request that cannot be answered as asked: its HTTP status, a short code and a readable message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
