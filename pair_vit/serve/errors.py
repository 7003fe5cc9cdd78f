"""ServeError: a request the service refuses, with the HTTP status and a message naming the problem."""
from __future__ import annotations


class ServeError(Exception):
    """Answered as `{"error": message}` with `status` (4xx: the request's fault; the server keeps serving)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
