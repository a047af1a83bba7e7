"""Reading ahead: the next chunk of samples is read, collated and (for a GPU) copied to the
device while the current one is attacked.

:func:`prefetch` runs an iterator one item ahead in a background thread (reading a file, a
``pread`` or a decoder mostly releases the GIL, so on a machine with a spare core the reading
costs no wall time). :class:`Mover` moves chunks to the model's device: to a CUDA device through
pinned memory on a side stream, so the copy overlaps the kernels already queued; on the CPU it
does nothing, so a CPU-only run neither pins nor copies.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["prefetch", "Mover"]

T = TypeVar("T")

_END = object()
_POLL_S = 0.05  # how often a blocked reader looks whether the consumer has stopped


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], *, depth: int = 1) -> Generator[T, None, None]:
    """The items of ``items`` in their order, each read by a background thread while the
    caller works on the one before (at most ``depth`` items wait, read and unclaimed).

    The first item is read in the caller's thread: a ``DataLoader`` with workers starts them
    there, and the warnings said on a first read go through the caller's warning filters. An
    error raised while reading is raised to the caller, at the item it concerns. Closing the
    returned iterator (or leaving a ``for`` loop over it by an exception, once it is collected)
    stops the reader after the item it is reading.
    """
    it = iter(items)
    try:
        first = next(it)
    except StopIteration:
        return
    waiting: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def hand(item: Any) -> bool:
        while not stop.is_set():
            try:
                waiting.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in it:
                if not hand(item):
                    return
            hand(_END)
        except BaseException as e:  # handed to the caller, raised there
            hand(_Failed(e))

    reader = threading.Thread(target=read, name="advx-prefetch", daemon=True)
    reader.start()
    try:
        yield first
        del first
        while True:
            item = waiting.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        reader.join()
        close = getattr(it, "close", None)
        if close is not None:  # a generator: its own cleanup (a DataLoader's workers) now
            close()


class Mover:
    """Moves CPU chunks to ``device``. :meth:`send` may run in a reading thread, ahead of the
    chunk's use; :meth:`receive`, in the thread that uses it, makes the work queued after it
    wait for the copy.

    To a CUDA device a chunk goes through pinned (page-locked) memory on a side stream, so the
    copy runs while the kernels of the previous chunk do. Elsewhere it is a plain ``.to`` (and
    nothing at all when the chunk is already there): a CPU-only run pays for no pinning.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    def send(self, x: Tensor) -> tuple[Tensor, Any]:
        """Start moving ``x``; what :meth:`receive` takes."""
        if x.device == self.device or (
            self.device.type == "cuda" and x.device.type == "cuda" and self.device.index is None
        ):
            return x, None
        if self._stream is None or x.device.type != "cpu":
            return x.to(self.device), None
        with torch.cuda.stream(self._stream):
            moved = x.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return moved, done

    def receive(self, sent: tuple[Tensor, Any]) -> Tensor:
        """The moved tensor, ready for the work queued on the current stream after this."""
        x, done = sent
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            # allocated on the side stream, used on this one: the allocator must not reuse it
            # before this stream is done with it
            x.record_stream(current)
        return x
