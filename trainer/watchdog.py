"""The watchdog: ends a run that stops making progress, with a message that says what actually happened.

Two bounds. Start-up, from the rendezvous to the end of this session's first optimizer step (T5 and the
transformer read from a network filesystem, the first step of a real-size model on a slow device, a compile),
is bounded by ``run.startup_timeout_s``; from then on a step without progress is bounded by
``run.collective_timeout_s``. The default process group's own timeout follows the same two bounds
(trainer/loop.py switches both after the first step), a minute longer during start-up so that this message,
which names the slow rank, comes before gloo's or NCCL's, which does not. The groups DeepSpeed makes for
itself keep torch's default timeout (30 min for gloo, 10 for NCCL): for them this watchdog is the bound.

During start-up each rank posts its host and what it is doing to the rendezvous store (the TCPStore that every
launcher's env:// rendezvous provides): it answers while the collectives wait, so a rank whose start-up bound
passes can name the ranks still starting up instead of guessing.

The watchdog is also the backstop for a hang the collective backend does not time out: a peer that is stopped
rather than dead left gloo waiting in an all-reduce well past its timeout (measured here), and a stuck data
loader or filesystem has no timeout at all.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from trainer.errors import EXIT_LOST_PEER

STARTUP_COLLECTIVE_MARGIN_S = 60.0  # start-up collectives outwait the watchdog by this much


class RollCall:
    """Every rank's start-up progress in the rendezvous store: ``trainer/startup/<rank>`` = [host, what it is
    doing, how many things it has started, done], and ``trainer/startup/<rank>/<what>`` once it got there.
    Ranks run the same start-up in the same order, so the ranks that have started fewer things than the others
    are the ones the others wait for."""

    PREFIX = "trainer/startup/"

    def __init__(self, connect: Callable[[], dist.Store], rank: int, world_size: int):
        # Connections of its own: the process group's client may be blocked in a wait of the main thread (a new
        # group's rendezvous), and one client is not to be used from two threads at once.
        self.connect, self.rank, self.world_size = connect, rank, world_size
        self.store = connect()  # the training thread's, for posting
        self.host, self.count = socket.gethostname(), 0

    @classmethod
    def of_process_group(cls, rank: int, world_size: int) -> RollCall | None:
        """The roll call over the default process group's rendezvous store (None unless it is a TCPStore)."""
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            return None
        while isinstance(store, dist.PrefixStore):  # the rendezvous store itself: one name for every reader
            store = store.underlying_store
        if not isinstance(store, dist.TCPStore):
            return None
        host, port = store.host, store.port
        return cls(lambda: dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                         timeout=timedelta(seconds=30)), rank, world_size)

    def post(self, doing: str, done: bool = False) -> None:
        self.count += 1
        value = json.dumps([self.host, doing, self.count, done])
        self.store.set(f"{self.PREFIX}{self.rank}", value)
        self.store.set(f"{self.PREFIX}{self.rank}/{doing}", value)  # a key per point reached: store.wait() finds it

    def behind(self) -> tuple[list[tuple[int, str, str]], bool]:
        """(rank, host, what it is doing) of the ranks furthest behind in start-up, and whether any rank is
        ahead of them (False: every rank is still at the same point, none waits for another). A rank that
        never posted has not come past the rendezvous."""
        store = self.connect()  # the watchdog thread's own; a store whose host is gone fails within 30 s
        seen = []
        for rank in range(self.world_size):
            key = f"{self.PREFIX}{rank}"
            if store.check([key]):
                host, doing, count, done = json.loads(store.get(key))
                seen.append((float("inf") if done else count, rank, host, doing))
            else:
                seen.append((0, rank, "?", "not yet past the rendezvous"))
        lowest = min(count for count, *_ in seen)
        return ([(r, host, doing) for count, r, host, doing in seen if count == lowest],
                any(count > lowest for count, *_ in seen))


class Watchdog:
    """Ends the process if the training thread reports no progress for the current bound (start-up's until
    ``started_up``, then the steady one). Watches from ``start`` until ``stop``."""

    def __init__(self, startup_s: float, steady_s: float, rank: int, world_size: int,
                 roll_call: RollCall | None = None):
        self.startup_s, self.steady_s, self.rank, self.world_size = startup_s, steady_s, rank, world_size
        self.roll_call = roll_call
        self.in_startup = True
        self._began = self._last = time.monotonic()
        self._what = "start-up"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trainer-watchdog", daemon=True)

    def start(self) -> None:
        self.progress("joining the process group")
        self._thread.start()

    def progress(self, what: str) -> None:
        self._last, self._what = time.monotonic(), what
        if self.in_startup and self.roll_call is not None:
            self.roll_call.post(what)

    def restart_startup(self, what: str) -> None:
        """Start the start-up clock again: what comes next (validation left undone by a stop, before the first
        step) gets the whole start-up bound of its own."""
        self._began = time.monotonic()
        self.progress(what)

    def started_up(self) -> None:
        """Start-up is over (the session's first optimizer step is done): the steady bound applies from now."""
        self._last, self._what = time.monotonic(), "the first optimizer step"  # before the switch the thread reads
        self.in_startup = False
        if self.roll_call is not None:
            self.roll_call.post("training", done=True)

    def stop(self) -> None:
        self._stopped.set()

    @property
    def bound(self) -> float:
        return self.startup_s if self.in_startup else self.steady_s

    def _watch(self) -> None:
        while not self._stopped.wait(min(5.0, self.bound / 4)):
            startup = self.in_startup  # read once: the training thread may switch it meanwhile
            idle = time.monotonic() - (self._began if startup else self._last)
            if idle > (self.startup_s if startup else self.steady_s):
                print(f"error [rank {self.rank} on {socket.gethostname()}]: {self.message(idle, startup)}; "
                      f"stopping. Rerun the same command to resume from the last complete checkpoint.",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_LOST_PEER)

    def message(self, idle: float, startup: bool | None = None) -> str:
        if self.in_startup if startup is None else startup:
            return self._startup_message(idle)
        if self.world_size == 1:
            return (f"no progress for {idle:.0f} s since {self._what} (run.collective_timeout_s="
                    f"{self.steady_s:g}): the step hangs (a stuck filesystem or data read?)")
        return (f"lost contact with another rank: no progress for {idle:.0f} s since {self._what} "
                f"(run.collective_timeout_s={self.steady_s:g})")

    def _startup_message(self, idle: float) -> str:
        head = (f"start-up did not finish within run.startup_timeout_s={self.startup_s:g} ({idle:.0f} s; this "
                f"rank is at: {self._what})")
        if self.world_size == 1 or self.roll_call is None:
            return head
        try:
            behind, others_ahead = self.roll_call.behind()
        except (RuntimeError, OSError, ValueError) as exc:  # rank 0, the store's host, is gone
            return f"{head}; the other ranks cannot be asked ({str(exc).splitlines()[0][:200]})"
        if not others_ahead:
            return f"{head}; every rank is still at the same point: start-up itself is slower than the bound"
        named = ", ".join(f"rank {r} on {host} (at: {doing})" if r != self.rank else f"this rank, {r}"
                          for r, host, doing in behind)
        return f"{head}; the other ranks wait for the slowest: {named}"


def set_collective_timeout(seconds: float) -> None:
    """The default process group's timeout from now on (both gloo and NCCL take a new one; torch has no public
    setter, and an older torch without this one keeps the start-up timeout, with the watchdog as the bound)."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timedelta(seconds=seconds))
