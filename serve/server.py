"""Running the app on uvicorn: one line on stdout once the service answers (socket bound, model
warmed up), SIGTERM / SIGINT drain the service and exit normally (exit code 0)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import signal
import socket
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from deltalm.errors import InputError


def check_listen_address(host: str, port: int) -> None:
    """``host:port`` can be listened on, tried by binding it the way uvicorn will (with
    SO_REUSEADDR) and closing it at once; otherwise one ``InputError`` line saying what to change.
    Meant to run before the model is loaded. Port 0 (any free port) always can."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise InputError(_bind_failure(host, port, e)) from None


def _bind_failure(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (another server is listening there): pick another with "
            f"--port N (e.g. --port {port + 1}), or --port 0 for any free port"
        )
    if e.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need privileges): pick one above 1023"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine"
    return f"cannot listen on {host}:{port}: {e.strerror or e}"


class _Server(uvicorn.Server):
    """uvicorn's server, but a signal ends it gracefully and is not re-raised at the end (uvicorn
    re-raises it so that the process dies of the signal: exit code -15 instead of 0). The first
    SIGTERM / SIGINT also tells the service to stop taking requests and to decode what is queued
    without waiting for more; a second SIGINT forces the exit.

    Shutdown keeps the listening socket open until every accepted request is answered, answering
    what comes meanwhile with 503 (uvicorn closes it first: the connections the kernel had
    completed into its accept queue, and the requests already sent on idle kept-alive connections,
    were then reset unanswered)."""

    # after the last accepted request is answered, how long connections still waiting in the
    # accept queue (or requests unread on idle connections) are taken in and answered 503, at most
    LAST_CALL_S = 2.0

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None], service) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._service = service

    async def shutdown(self, sockets=None) -> None:
        while not self.force_exit:
            try:
                await asyncio.wait_for(self._service.wait_answered(), 0.1)
                break
            except asyncio.TimeoutError:
                continue
        last_call = time.monotonic() + self.LAST_CALL_S
        while (
            not self.force_exit
            and time.monotonic() < last_call
            and (self._service.accepted or self._queued_connections() or self._unread_requests())
        ):
            await asyncio.sleep(0.01)  # the event loop accepts and reads them
        await super().shutdown(sockets)

    def _queued_connections(self) -> bool:
        """A connection waits in a listening socket's accept queue (the socket is readable)."""
        fds = [sock.fileno() for server in self.servers for sock in server.sockets]
        return bool(fds) and bool(select.select(fds, [], [], 0)[0])

    def _unread_requests(self) -> bool:
        """An idle connection (no request in progress) has bytes the server has not read: closing it
        now would reset it."""
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if (cycle is not None and not cycle.response_complete) or transport is None or transport.is_closing():
                continue
            buffered = getattr(getattr(connection, "conn", None), "trailing_data", (b"", False))[0]
            sock = transport.get_extra_info("socket")
            if buffered or (sock is not None and select.select([sock.fileno()], [], [], 0)[0]):
                return True
        return False

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


def serve_app(app: FastAPI, host: str, port: int, on_ready: Callable[[str], None], log_level: str = "warning") -> None:
    """Serve ``app`` (from ``deltalm.serve.app.create_app``) until SIGTERM / SIGINT; ``on_ready``
    gets the address (``http://host:port``, the real port when ``port`` is 0) once the socket is
    bound and the model warmed up. A failed warm-up is raised here."""
    service = app.state.service
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=None
    )
    server = _Server(config, service.begin_drain, service)

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

    try:
        asyncio.run(main())
    except SystemExit:
        # uvicorn exits when it cannot bind (the port was taken after check_listen_address)
        if server.started:
            raise
        raise InputError(
            f"cannot listen on {host}:{port} (in use or not allowed): pick another with --port N, "
            "or --port 0 for any free port"
        ) from None
