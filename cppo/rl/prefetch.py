"""The next step's host work, done in a background thread while the current step runs on the device.

    prefetch = Prefetcher(prepare, enabled=cfg.prefetch)   # prepare(draws) -> Prompts
    prompts = prefetch.get(draws)          # this step's: made in the background, or made now
    prefetch.submit(next_draws)            # the next step's, started at once
    prefetch.close()

`prepare` (the loop's: load the samples' images, encode the prompts, draw and encode the views,
cppo.rl.rollout.prepare_prompts) reads no global random state and no model, so what it makes in the
thread equals what it makes in turn: `get` hands back the prepared result only for the very draws
it was made for (same indices, same view seeds), and prepares anything else in turn. An error in
the thread (a missing image) is raised by `get`, at the step that needs the prompts, as it would
be in turn. The thread must use its own processor (the loop gives it a copy): a fast tokenizer
shared between threads fails ("Already borrowed") when both set their padding at once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cppo.rl.sampler import Draw


def _key(draws: list[Draw]) -> tuple:
    return tuple((d.index, d.epoch, d.view_seed) for d in draws)


class Prefetcher:
    """One background worker that prepares the next step's prompts (module docstring)."""

    def __init__(self, prepare: Callable[[list[Draw]], object], enabled: bool = True):
        self.prepare = prepare
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cppo-prefetch") if enabled else None
        self._pending: tuple[tuple, Future] | None = None
        self.hits = 0  # steps whose prompts came from the thread

    def submit(self, draws: list[Draw]) -> None:
        """Start preparing `draws` in the background (nothing when disabled)."""
        if self._pool is None:
            return
        self._drop()
        self._pending = (_key(draws), self._pool.submit(self.prepare, draws))

    def get(self, draws: list[Draw]):
        """The prepared prompts of `draws`: the background result when it was made for them, else
        prepared now (after any other background work has finished)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == _key(draws):
            self.hits += 1
            return pending[1].result()
        if pending is not None:
            pending[1].cancel()
            _wait_quietly(pending[1])
        return self.prepare(draws)

    def _drop(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            _wait_quietly(self._pending[1])
            self._pending = None

    def close(self) -> None:
        """Stop the worker: a task not started is dropped, one running is waited for."""
        self._drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _wait_quietly(future: Future) -> None:
    """Wait for work whose result is not wanted; its error, if any, is not this step's."""
    if not future.cancelled():
        future.exception()
