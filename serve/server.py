"""Running the app on uvicorn: one line on stdout once the service answers (socket bound, model
warmed up), SIGTERM / SIGINT drain the service and exit normally (exit code 0)."""
from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    """uvicorn's server, but a signal ends it gracefully and is not re-raised at the end (uvicorn
    re-raises it so that the process dies of the signal: exit code -15 instead of 0). The first
    SIGTERM / SIGINT also tells the service to stop taking requests and to decode what is queued
    without waiting for more; a second SIGINT forces the exit."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()

        def handle(sig, frame):
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            loop.call_soon_threadsafe(self._on_signal)

        originals = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def serve_app(app: FastAPI, host: str, port: int, on_ready: Callable[[str], None],
              log_level: str = "warning") -> None:
    """Serve ``app`` (from ``deltalm.serve.app.create_app``) until SIGTERM / SIGINT; ``on_ready``
    gets the address (``http://host:port``, the real port when ``port`` is 0) once the socket is
    bound and the model warmed up. A failed warm-up is raised here."""
    service = app.state.service
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=None)
    server = _Server(config, service.begin_drain)

    async def main() -> None:
        serving = asyncio.get_running_loop().create_task(server.serve())
        while not (server.started and service.ready.is_set()):
            warm = getattr(app.state, "warmup_task", None)
            if serving.done() or (warm is not None and warm.done() and warm.exception() is not None):
                break
            await asyncio.sleep(0.01)
        else:
            bound = server.servers[0].sockets[0].getsockname()
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            on_ready(f"http://{shown}:{bound[1]}")
        warm = getattr(app.state, "warmup_task", None)
        if warm is not None and warm.done() and warm.exception() is not None:
            server.should_exit = True
            await serving
            raise warm.exception()
        await serving

    asyncio.run(main())
