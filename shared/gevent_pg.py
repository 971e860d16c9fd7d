"""A psycopg wait function native to gevent, for the API's gevent workers.

Under gevent's monkey-patching psycopg falls back to ``wait_poll`` on the patched ``select``
module: every wait builds a gevent poll object, starts a watcher per descriptor and a
timer for psycopg's 0.1 s wake-up interval, and reports through Python-level result
objects, also when the socket is ready already (a pipeline's sends almost always are).
``wait_gevent`` asks the kernel first with the real, non-blocking ``poll(0)`` and parks the
greenlet on one io watcher only when the socket is not ready, with a timer only when the
caller set a deadline (the interval exists for Ctrl-C in blocking waits; gevent's hub
handles signals). Same contract as psycopg's wait functions: consume the generator, send
it the readiness, raise ``_WaitTimeout`` past ``timeout``. ``poll`` has no descriptor
limit (``select`` refuses fd >= 1024, which a process holding thousands of websockets
reaches: tests/test_gevent_db.py).
"""
from __future__ import annotations

import select
from time import monotonic

from gevent import Timeout, get_hub
from gevent.monkey import get_original
from psycopg import errors as e
from psycopg.waiting import READY_NONE, READY_R, READY_W, Wait

_EXPIRED = type("_WaitExpired", (Exception,), {})
_real_poll = get_original("select", "poll")  # the kernel's poll, whatever gevent patched


def wait_gevent(gen, fileno: int, interval: float = 0.0, timeout: float | None = None):
    hub = get_hub()
    poller = _real_poll()
    deadline = monotonic() + timeout if timeout is not None else None
    try:
        s = next(gen)
        poller.register(fileno, _POLL_MASK[s])
        while True:
            events = poller.poll(0)
            if not events:
                watcher = hub.loop.io(fileno, _LOOP_MASK[s])
                try:
                    if deadline is None:
                        hub.wait(watcher)
                    else:
                        with Timeout(max(0.0, deadline - monotonic()), _EXPIRED):
                            hub.wait(watcher)
                except _EXPIRED:
                    pass
                finally:
                    watcher.close()
                events = poller.poll(0)
            if events:
                ev = events[0][1]
                ready = (READY_R if ev & select.POLLIN else 0) | (
                    READY_W if ev & select.POLLOUT else 0)
                if not ready and ev & _POLL_BAD:
                    raise e.OperationalError("connection socket closed")
                if ready:
                    s = gen.send(ready)
                    poller.modify(fileno, _POLL_MASK[s])
            else:
                gen.send(READY_NONE)
            if deadline is not None and monotonic() >= deadline:
                raise e._WaitTimeout("wait timeout expired")
    except StopIteration as ex:
        return ex.value


_POLL_MASK = {Wait.R: select.POLLIN, Wait.W: select.POLLOUT,
              Wait.RW: select.POLLIN | select.POLLOUT}
_LOOP_MASK = {Wait.R: 1, Wait.W: 2, Wait.RW: 3}  # gevent's loop.io: READ = 1, WRITE = 2
_POLL_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


def install() -> bool:
    """Make psycopg wait with ``wait_gevent`` when gevent has patched ``select``; returns
    whether it did. ``PSYCOPG_WAIT_FUNC`` (psycopg's own override) wins."""
    import os

    import psycopg.waiting as waiting
    from gevent import monkey

    if "PSYCOPG_WAIT_FUNC" in os.environ or not monkey.is_module_patched("select"):
        return False
    waiting.wait = wait_gevent
    return True
