"""Errors a user can act on: each names the input field at fault and what is allowed."""

from __future__ import annotations


class InputError(ValueError):
    """A request input is invalid; the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
