"""Micro-batched routing decisions for the proxy (dmr.serve): concurrent requests share router calls.

A router decides a list of contexts in one call (dmr.routing), and one call of N contexts costs
about what one of a single context does (one encoder batch, one Transformer pass). The batcher
holds each context for at most `window_ms` after the oldest waiting one arrived, then makes one
call of everything waiting, with at most one context per episode: the router's per-episode cache
advances one step per call, so a second request of an episode already in the call (a retry, a
client that does not wait for its answer) waits for the next call, in arrival order.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class _Waiting:
    """One context waiting for its decision."""

    def __init__(self, ctx):
        self.ctx, self.arrived = ctx, time.perf_counter()
        self.done = threading.Event()
        self.result = self.error = None


class Batcher:
    """`submit(ctx)` blocks until `decide` (called from one worker thread with a list of contexts of
    distinct episodes, returning one result per context) has decided it, and returns its result.
    A failing call raises its exception in every request it held."""

    def __init__(self, decide: Callable[[list], list], window_ms: float):
        if window_ms <= 0:
            raise ValueError("a batcher needs a window > 0 ms; without one, decide each request alone")
        self.decide, self.window = decide, window_ms / 1000
        self.waiting: list[_Waiting] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._run, name="dmr-router-batcher", daemon=True).start()

    def submit(self, ctx):
        w = _Waiting(ctx)
        with self.cond:
            self.waiting.append(w)
            self.cond.notify()
        w.done.wait()
        if w.error is not None:
            raise w.error
        return w.result

    def _take(self) -> list[_Waiting]:
        """The next call's contexts: the first waiting one of each episode, in arrival order."""
        with self.cond:
            batch, rest, episodes = [], [], set()
            for w in self.waiting:
                (rest if w.ctx.episode in episodes else batch).append(w)
                episodes.add(w.ctx.episode)
            self.waiting = rest
        return batch

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                oldest = self.waiting[0].arrived
            delay = oldest + self.window - time.perf_counter()
            if delay > 0:  # collect what arrives within the window of the oldest waiting context
                time.sleep(delay)
            batch = self._take()
            try:
                results = self.decide([w.ctx for w in batch])
            except Exception as e:  # the worker must survive a failing call
                for w in batch:
                    w.error = e
            else:
                for w, r in zip(batch, results):
                    w.result = r
            for w in batch:
                w.done.set()
