"""``python -m service --model PATH --host H --port P``: serve an exported model with uvicorn.

The model is loaded before the server starts, so a missing, corrupt or foreign file ends the process
with one line and exit status 1. SIGTERM drains: /readyz turns 503 at once, requests keep being served
for ``MRCNN_DRAIN_GRACE_S`` (so a load balancer can notice), then the listeners close (HTTP and gRPC, whose
health service turned NOT_SERVING with readiness), in-flight requests finish and the process exits with
status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.app import load_app_or_exit
from service.core.settings import Settings
from service.web.logs import configure_logging


class OneSendTransport:
    """An asyncio transport whose writes within one event-loop step leave in a single ``send``.

    uvicorn writes a response's status line and headers, then its body, in two writes. A replica
    killed between the two (SIGKILL, OOM) leaves the load balancer holding a header without its
    body: nginx has already answered the client and cannot retry the request elsewhere, so the
    client sees a truncated response. Written together, a response is all or nothing on the wire,
    and nothing means nginx retries it on another replica (docker/nginx.conf, proxy_next_upstream).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(bytes(data))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class OneSendH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol writing each response in one send (see OneSendTransport)."""

    # uvicorn narrows asyncio.Protocol.connection_made to a Transport itself (with the same ignore).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn hands a Transport; asyncio declares BaseTransport
        super().connection_made(OneSendTransport(transport))  # type: ignore[arg-type]  # a Transport by duck typing


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], grace_s: float,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._grace_s = grace_s
        self._on_close = on_close
        self._stop_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the process
        # would die by the signal instead of exiting 0 after a clean drain.
        if self._stop_at is not None:  # a second signal: stop now
            self.should_exit = True
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self._on_drain()
        self._stop_at = time.monotonic() + self._grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Close the HTTP listener and, at the same moment, ``on_close`` (the gRPC door): both stop taking
        requests and finish those in flight."""
        closing = [self._on_close()] if self._on_close is not None else []
        await asyncio.gather(super().shutdown(sockets), *closing)

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.should_exit = True
        return await super().on_tick(counter)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="ONNX file (default: MRCNN_MODEL_PATH or the demo model)")
    p.add_argument("--host", help="bind address (default: MRCNN_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: MRCNN_PORT or 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port, 0: none (default: MRCNN_GRPC_PORT or 8001)")
    p.add_argument("--ssl-certfile", type=Path, help="serve HTTPS with this PEM certificate chain "
                   "(default: MRCNN_SSL_CERTFILE)")
    p.add_argument("--ssl-keyfile", type=Path, help="the certificate's PEM private key (default: MRCNN_SSL_KEYFILE)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    given = {"model_path": args.model, "host": args.host, "port": args.port, "grpc_port": args.grpc_port,
             "ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_format, args.log_level)
    app = load_app_or_exit(settings)
    pipeline = app.state.pipeline

    def on_drain() -> None:
        pipeline.drain()
        logging.getLogger("service").info("SIGTERM: draining (readiness off)")

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None, lifespan="on", http=OneSendH11Protocol,
        log_config=None,  # uvicorn's lines go through our handler (configure_logging): same format, same context
        ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
    )
    grpc_door = app.state.grpc
    on_close = partial(grpc_door.stop, settings.drain_timeout_s) if grpc_door is not None else None
    DrainingServer(config, on_drain, settings.drain_grace_s, on_close).run()


if __name__ == "__main__":
    main()
