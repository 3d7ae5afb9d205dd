"""The one-at-a-time line and the work beside it (`lassie.serial`), without Cog or torch."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lassie.serial import SerialRunner


class Interrupted(BaseException):
    """Stands in for coglet's CancelationException."""


def test_work_aside_finishes_while_the_line_is_busy():
    runner = SerialRunner(interrupt=Interrupted)
    release = threading.Event()

    async def main() -> tuple[str, bool]:
        busy = asyncio.ensure_future(runner.run(lambda: release.wait(30)))
        fetched = await runner.run_aside(lambda: "fetched")
        waiting = not busy.done()
        release.set()
        await busy
        return fetched, waiting

    assert asyncio.run(main()) == ("fetched", True)


def test_cancelling_work_aside_interrupts_it():
    runner = SerialRunner(interrupt=Interrupted)
    started, stopped = threading.Event(), threading.Event()

    def fetch() -> None:
        started.set()
        try:
            while True:
                time.sleep(0.01)
        except Interrupted:
            stopped.set()
            raise

    async def main() -> None:
        task = asyncio.ensure_future(runner.run_aside(fetch))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert stopped.wait(30), "the cancelled fetch kept running"
    assert runner.run_now(lambda: "still serving") == "still serving"
