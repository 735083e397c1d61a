"""Graceful drain on SIGTERM (DESIGN 10 "Drain"; the contract is docs/reliability.md).

    SIGTERM (or SIGINT)   /readyz answers 503 `draining` at once; everything that arrives is still answered, with
                          `Connection: close`, so keep-alive clients and load balancers reconnect elsewhere
    + XCROSS_DRAIN_S      stop accepting; idle connections are closed, busy ones after their response; every
                          request in flight and every batch queued is finished; the batcher and engine close
    exit 0                within XCROSS_GRACEFUL_TIMEOUT_S of the signal (drain included): past it, requests
                          still running are cancelled, and a watchdog ends a stuck process with status 1
    a second signal       stops at once: the process ends as killed by that signal (-15 / 143, -2 / 130)

`DrainingServer` is uvicorn's `Server` with the first signal turned into a drain (uvicorn's own stops accepting at
once, which resets the requests that keep-alive clients are sending on their open connections) and without
uvicorn's re-raise of the signal after a clean shutdown (the clean shutdown exits 0). `CloseWhileDraining` is the
ASGI middleware that adds `Connection: close` to responses while draining (uvicorn's h11 protocol then closes the
connection after the response).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("service.drain")
EXIT_OVERDUE = 1  # the watchdog's status when the graceful timeout passed before the process ended


class CloseWhileDraining:
    """Adds `Connection: close` to every HTTP response that starts while `is_draining()` is true."""

    def __init__(self, app: ASGIApp, is_draining: Callable[[], bool]):
        self.app, self.is_draining = app, is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_close(message: Message) -> None:
            if message["type"] == "http.response.start" and self.is_draining():
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_close)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain on the first SIGTERM/SIGINT and an immediate stop on the second."""

    def __init__(self, config: uvicorn.Config, *, drain_s: float, graceful_timeout_s: float,
                 on_drain: Callable[[], None] = lambda: None):
        super().__init__(config)
        self.drain_s, self.graceful_timeout_s, self.on_drain = drain_s, graceful_timeout_s, on_drain
        self.drain_started: float | None = None  # time.monotonic() of the first signal
        self._watchdog: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self.drain_started is not None:
            log.warning("second %s while draining: stopping at once", name)
            sys.stderr.flush()
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)  # ends the process as killed by the signal
            return
        self.drain_started = time.monotonic()
        self.on_drain()
        log.info("%s: draining for %g s (/readyz 503, Connection: close), then stopping; exit within %g s; "
                 "a second signal stops at once", name, self.drain_s, self.graceful_timeout_s)
        self._watchdog = threading.Timer(self.graceful_timeout_s, self._overdue)
        self._watchdog.daemon = True
        self._watchdog.start()

    async def on_tick(self, counter: int) -> bool:
        if (self.drain_started is not None and not self.should_exit
                and time.monotonic() - self.drain_started >= self.drain_s):
            log.info("drain over: no new connections; finishing the requests in flight (%d connections open)",
                     len(self.server_state.connections))
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list | None = None) -> None:
        # uvicorn waits this long for the connections and tasks in flight, then cancels them; what is left of the
        # graceful timeout after the drain, less a reserve for the lifespan shutdown (batcher and engine close)
        left = self.graceful_timeout_s - (time.monotonic() - (self.drain_started or time.monotonic()))
        self.config.timeout_graceful_shutdown = max(0.1, left - min(1.0, 0.1 * self.graceful_timeout_s))
        await super().shutdown(sockets=sockets)
        if self.drain_started is not None:
            log.info("stopped %.2f s after the signal", time.monotonic() - self.drain_started)

    def _overdue(self) -> None:
        log.error("still running %g s after the signal (XCROSS_GRACEFUL_TIMEOUT_S): exiting with status %d",
                  self.graceful_timeout_s, EXIT_OVERDUE)
        sys.stderr.flush()
        os._exit(EXIT_OVERDUE)

    def run(self, sockets: list | None = None) -> None:
        try:
            super().run(sockets=sockets)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
