"""How many threads torch uses for a block of code.

A row of small, memory-bound tensor operations (scoring, slicing or copying each weight of
a model) runs faster on one thread than on torch's intra-op pool, which synchronises its
threads once per operation: a little faster on an idle machine, an order of magnitude on a
busy one, where every synchronisation waits for a descheduled thread. Slicing every weight
of torchvision's resnet50 with ``index_select`` took 0.75 s on two threads and 0.02 s on
one, deep-copying it 0.92 s and 0.20 s (2 cores, load average 10). Model runs, a few
large operations each, keep the pool.

>>> import torch
>>> with one_thread():
...     torch.get_num_threads()
1
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["one_thread", "torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch using ``threads`` intra-op threads (None: leave as is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """Run the block with torch on one intra-op thread: for a row of small tensor
    operations over a model's weights (see the module docstring)."""
    return torch_threads(1)
