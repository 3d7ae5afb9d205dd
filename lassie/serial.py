"""Setup and predictions one at a time on one thread, behind an async Cog predictor with two slots.

Why: coglet answers the HTTP request when the worker's "done" message arrives, but puts the slot
back into its pool only when the worker's separate "idle" message has been handled. With a single
slot (a sync `predict`), a client that sends its next request as soon as the previous one returned
often gets HTTP 409 "At capacity". With two slots (`concurrency.max` in cog.yaml, which needs an
async `predict`) the next request always finds the other slot free; this runner keeps the GPU
doing one prediction at a time, in arrival order, so a waiting request costs no GPU memory.

Work that needs no GPU and may take long (decoding images, fetching an extra LoRA) runs beside
that line, on threads of its own (`run_aside`): a slow download holds only its own request.

A cancelled request that is still waiting never runs. A running one is interrupted the way coglet
interrupts a sync predictor: its exception type is raised in the thread that runs it.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Two Cog slots: at most two requests are prepared at once; a spare thread covers a cancelled one
# that has not reached its next interruptible point yet.
ASIDE_THREADS = 3

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc


def _raise_in_thread(thread: int, exception: type[BaseException] | None) -> None:
    """CPython's own way to raise in another thread (coglet uses it to cancel sync predictors);
    `None` clears an exception that has not been raised yet."""
    _set_async_exc(ctypes.c_ulong(thread), None if exception is None else ctypes.py_object(exception))


@dataclass
class _Job:
    thread: int | None = None
    cancelled: bool = False


class SerialRunner:
    def __init__(self, interrupt: type[BaseException]) -> None:
        """`interrupt` is raised inside a running call whose request was cancelled."""
        self._interrupt = interrupt
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lassie-predict")
        self._aside = ThreadPoolExecutor(max_workers=ASIDE_THREADS, thread_name_prefix="lassie-aside")
        self._lock = threading.Lock()

    def run_now(self, call: Callable[[], T]) -> T:
        """`call()` on the prediction thread, blocking: setup runs there too, so anything torch keeps
        per thread (CUDA graphs, the current stream) is the same for warm-up and predictions."""
        return self._executor.submit(contextvars.copy_context().run, call).result()

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` after every earlier call has finished, in the caller's context (coglet routes
        log lines to the prediction through context variables)."""
        return await self._submit(self._executor, call)

    async def run_aside(self, call: Callable[[], T]) -> T:
        """`call()` now, on a thread of its own, outside the one-at-a-time line: for work that does
        not touch the GPU. Cancelling interrupts it the same way."""
        return await self._submit(self._aside, call)

    async def _submit(self, executor: ThreadPoolExecutor, call: Callable[[], T]) -> T:
        job = _Job()
        context = contextvars.copy_context()
        pending = executor.submit(self._run_job, job, context, call)
        try:
            return await asyncio.wrap_future(pending)
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def _run_job(self, job: _Job, context: contextvars.Context, call: Callable[[], T]) -> T:
        with self._lock:
            if job.cancelled:
                raise self._interrupt()
            job.thread = threading.get_ident()
        try:
            return context.run(call)
        finally:
            with self._lock:
                job.thread = None
                # An interrupt that arrived after `call` returned is dropped here, inside the job,
                # so it can never reach the executor's own loop.
                _raise_in_thread(threading.get_ident(), None)

    def _cancel(self, job: _Job) -> None:
        with self._lock:
            job.cancelled = True
            if job.thread is not None:
                _raise_in_thread(job.thread, self._interrupt)
