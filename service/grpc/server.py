"""The gRPC front door's server: ``inference.GRPCInferenceService``, the standard health service
(``grpc.health.v1``: SERVING while the pipeline is ready, NOT_SERVING while starting or draining) and server
reflection (so ``grpcurl`` lists and calls the services without the proto files), on one grpc.aio server in
the app's event loop.

Its largest request message is the upload limit (``MRCNN_MAX_UPLOAD_BYTES``); gRPC itself refuses a bigger
one with RESOURCE_EXHAUSTED before any of our code runs. The port is bound without SO_REUSEPORT, so a port
already in use fails the start instead of sharing the traffic with another process.

``stop`` is the drain: no new RPC is accepted from then on, those in flight get up to the grace period to
finish. The app stops it before the pipeline (service/app.py); ``python -m service`` stops it as soon as
SIGTERM's grace period ends, together with the HTTP listener (service/__main__.py).

API keys and TLS: ``interceptors`` (grpc.aio server interceptors) and ``credentials``
(``grpc.ssl_server_credentials``: ``add_secure_port``; None: plain). The app passes service/grpc/auth.py's
key check when API keys are set and the HTTP side's certificate when TLS is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service.core.pipeline import Pipeline, State
from service.grpc.servicer import InferenceServicer

log = logging.getLogger("service")
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH = {"ready": health_pb2.HealthCheckResponse.SERVING}  # any other state: NOT_SERVING


class GrpcDoor:
    """The gRPC server of one app: built, bound and started by ``start`` (in the event loop it will serve
    from: a grpc.aio server belongs to the loop it was made in), drained by ``stop``."""

    def __init__(
        self,
        pipeline: Pipeline,
        server_version: str,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.servicer = InferenceServicer(pipeline, server_version)
        self.interceptors = interceptors
        self.credentials = credentials
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None  # made by start
        self._stopping: asyncio.Task[None] | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        """Serve on ``host:port`` (0 is not "any port" here: the app builds no door for port 0), the health
        service following the pipeline's state from now on."""
        server = self.server = grpc.aio.server(
            interceptors=self.interceptors,
            options=[
                ("grpc.max_receive_message_length", self.pipeline.settings.max_upload_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{host}:{port}"
        if self.credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, self.credentials)
        loop = asyncio.get_running_loop()

        def follow(state: State) -> None:  # in whichever thread the state changed
            loop.call_soon_threadsafe(self._follow, state)

        self.pipeline.watch_state(follow)  # first, so that no change is missed while the initial state is set
        await self._set_health(self.pipeline.state)
        await server.start()
        log.info("gRPC: serving %s on %s", SERVICE_NAME, address)

    def _follow(self, state: State) -> None:
        """On the loop: the health service told of a new pipeline state."""
        task = asyncio.ensure_future(self._set_health(state))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, state: State) -> None:
        status = HEALTH.get(state, health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE_NAME):  # "": the server as a whole, as probes ask by default
            await self.health.set(service, status)

    async def stop(self, grace_s: float) -> None:
        """Accept no new RPC, give those in flight up to ``grace_s`` seconds, then end them. Safe to call
        again: a second call waits for the first."""
        if self.server is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(grace_s))
        await asyncio.shield(self._stopping)
