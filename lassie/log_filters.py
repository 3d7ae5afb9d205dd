"""Dropping known, harmless library log messages by their exact text, on the logger that emits them.

Cog shows every log line to the user, so a warning there should mean something. Lowering a
library logger's level would hide its other, useful warnings too: instead one filter on the
exact logger drops only records whose message starts with one of the given texts, and only
while the call that emits them runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager


class DropMessages(logging.Filter):
    """Rejects records whose message starts with one of `starts` (known, fixed message openings)."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


@contextmanager
def dropping(logger_name: str, *starts: str) -> Iterator[None]:
    """While the block runs, `logger_name`'s own records starting with `starts` are dropped."""
    logger = logging.getLogger(logger_name)
    drop = DropMessages(*starts)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextmanager
def dropping_all(messages: dict[str, tuple[str, ...]]) -> Iterator[None]:
    """`dropping` for several loggers at once: logger name -> message openings."""
    with ExitStack() as stack:
        for logger_name, starts in messages.items():
            stack.enter_context(dropping(logger_name, *starts))
        yield
