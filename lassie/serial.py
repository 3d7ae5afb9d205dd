"""Setup and predictions one at a time on one thread, behind an async Cog predictor with two slots.

coglet answers a request on the worker's "done" message but frees its slot only after the separate "idle" message: with
one slot (a sync `predict`), a client sending its next request at once often gets HTTP 409 "At capacity". With two
(`concurrency.max` in cog.yaml, async `predict`) the next request finds the other slot free, while this runner keeps
the GPU on one prediction at a time, in arrival order, so a waiting request costs no GPU memory. Work without the GPU
that may take long (decoding images, fetching an extra LoRA) runs beside that line (`run_aside`). A cancelled request
still waiting never runs; a running one gets its exception raised in its thread, as coglet does."""

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

# Two Cog slots: at most two requests are prepared at once; a spare thread covers a cancelled one that has not reached
# its next interruptible point yet.
ASIDE_THREADS = 3


def _raise_in_thread(thread: int, exception: type[BaseException] | None) -> None:
    """CPython's own way to raise in another thread (coglet cancels sync predictors so); `None` clears a pending one."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread),
                                                None if exception is None else ctypes.py_object(exception))


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
        """`call()` on the prediction thread, blocking: setup runs there too, so what torch keeps per thread (CUDA
        graphs, the current stream) is the same for warm-up and predictions."""
        return self._executor.submit(contextvars.copy_context().run, call).result()

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` after every earlier call, in the caller's context (coglet routes log lines through it)."""
        return await self._submit(self._executor, call)

    async def run_aside(self, call: Callable[[], T]) -> T:
        """`call()` now on a thread of its own, outside the line, for work without the GPU; cancelled the same way."""
        return await self._submit(self._aside, call)

    async def _submit(self, executor: ThreadPoolExecutor, call: Callable[[], T]) -> T:
        job = _Job()
        pending = executor.submit(self._run_job, job, contextvars.copy_context(), call)
        try:
            return await asyncio.wrap_future(pending)
        except asyncio.CancelledError:
            with self._lock:
                job.cancelled = True
                if job.thread is not None:
                    _raise_in_thread(job.thread, self._interrupt)
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
                # An interrupt that arrived after `call` returned is dropped here, inside the job, so it can never
                # reach the executor's own loop.
                _raise_in_thread(threading.get_ident(), None)
