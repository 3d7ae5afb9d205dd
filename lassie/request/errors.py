"""Errors a user can act on: each names the input field at fault and what is allowed."""

from __future__ import annotations

EXTRA_LORA_FIELD = "extra_lora"  # the one spelling of the field every extra-LoRA error names


class InputError(ValueError):
    """A request input is invalid; the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
