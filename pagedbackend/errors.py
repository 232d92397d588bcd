"""The one error type for bad input: a ValueError that also carries the offending field, so
adapters can answer with a 4xx that names it, and everything else can catch ValueError."""

from __future__ import annotations


class InvalidRequest(ValueError):
    def __init__(self, param: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
