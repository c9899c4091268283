"""The trainer's start-up work beside its main thread: on a daemon thread, or in a fork.

    in_background(work, name) -> Future   work() on a daemon thread; its result (or error) in the future
    in_child(work, name, send=, receive=) -> Future
                                          work() in a forked child, its result handed back through a pipe as bytes

The trainer's start-up tokenises data that is not in the cache so, beside the model's load. On a thread the two
share the GIL: the load took 1.16 s beside the tokenising against 0.22 s alone on the 2-core CPU machine (0.28 s
with the tokenising in a fork), and 1.16 s against 0.49 s on an H100 machine (bench/RESULTS.md,
`bench/model_load.py --beside thread,process`). In a child they share nothing.

A child is only a faster way, never the only one: where fork is missing, or the child fails, exits without a
result or sends one that cannot be read, work() runs again on a thread here, so what it raises is raised here,
with its message, as without the child. Fork it only while this process runs no other thread of its own (the
trainer's start-up), and only for work that touches no CUDA: the child inherits the parent's CUDA context and must
leave it alone. It dies with its parent, takes the default action on SIGTERM and SIGINT (the trainer's own handlers
are for the trainer), and leaves through os._exit: no atexit handlers, none of the parent's buffers flushed twice.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from ..control.parentage import die_with_parent

T = TypeVar("T")


def in_background(work: Callable[[], T], name: str) -> Future[T]:
    """`work` on a daemon thread; its result (or error) in the future. Unlike a thread pool's worker, it holds up
    neither a start-up that fails meanwhile (its `failed` event) nor the process's exit."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to whoever waits for the result
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def in_child(work: Callable[[], T], name: str, *, send: Callable[[T], bytes],
             receive: Callable[[bytes], T]) -> Future[T]:
    """work() in a fork; the child hands back send(result), and the future holds receive() of those bytes (which
    raises for bytes it cannot read). Call it from a thread that outlives the work, such as the main thread: Linux
    sends the parent-death signal when the forking thread ends."""
    if not hasattr(os, "fork"):
        return in_background(work, name)
    parent = os.getpid()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        _serve(lambda: send(work()), write_end, parent)
    os.close(write_end)
    return in_background(lambda: _collect(pid, read_end, work, receive), name)


def _serve(work: Callable[[], bytes], write_end: int, parent: int) -> None:
    code = 1
    try:
        die_with_parent(parent)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        payload = work()
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        code = 0
    finally:  # whatever happened: the parent gets a whole result or sees that it has none
        os._exit(code)


def _collect(pid: int, read_end: int, work: Callable[[], T], receive: Callable[[bytes], T]) -> T:
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()  # the GIL is let go while it waits
    try:
        _, status = os.waitpid(pid, 0)
        exited_well = os.waitstatus_to_exitcode(status) == 0
    except ChildProcessError:  # reaped elsewhere: receive() alone says whether the bytes are whole
        exited_well = True
    if exited_well and payload:
        try:
            return receive(payload)
        except Exception:  # noqa: BLE001 - cut short or not what send() makes: the work is done here instead
            pass
    return work()
