"""``inference.GRPCInferenceService``: the Open Inference Protocol's RPCs over the pipeline the REST doors use.

ModelInfer goes the way of REST's infer (service/oip/routes.py): the same model check, admission under the
deadline, parsing and encoding in worker threads around the shared ``answer_call``, the same metrics under
``route="grpc"`` with the status code's name as ``status``; ModelStreamInfer answers each request of a stream
the same way. The health RPCs answer as Triton's do:
ServerReady and ModelReady are false while starting or draining, and ModelReady is false, not an error, for a
model or version this server does not serve. The RPCs not implemented here (statistics, repository, shared
memory, trace, log settings) answer UNIMPLEMENTED, the generated base class's default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service.core.errors import NotFound, ServiceError
from service.core.pipeline import Pipeline
from service.grpc.errors import Failure, failure
from service.grpc.messages import (
    encode_infer,
    model_config_message,
    model_metadata_message,
    parse_infer,
    server_metadata_message,
)
from service.oip.model import answer_call, check_model

Context = Any  # grpc.aio.ServicerContext: grpcio has no type information


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # tritonclient has no type information
    """The protocol's RPCs for the model ``pipeline`` serves."""

    def __init__(self, pipeline: Pipeline, server_version: str) -> None:
        self.pipeline = pipeline
        self.info = pipeline.model.metadata
        self.server_version = server_version

    async def ServerLive(self, request: Any, context: Context) -> Any:  # noqa: N802 (the protocol's name)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Context) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.pipeline.state == "ready")

    async def ModelReady(self, request: Any, context: Context) -> Any:  # noqa: N802
        try:
            check_model(self.info, request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.pipeline.state == "ready")

    async def ServerMetadata(self, request: Any, context: Context) -> Any:  # noqa: N802
        return server_metadata_message(self.server_version)

    async def ModelMetadata(self, request: Any, context: Context) -> Any:  # noqa: N802
        await self._check_model(request.name, request.version, context)
        return model_metadata_message(self.info)

    async def ModelConfig(self, request: Any, context: Context) -> Any:  # noqa: N802
        await self._check_model(request.name, request.version, context)
        return model_config_message(self.info)

    async def ModelInfer(self, request: Any, context: Context) -> Any:  # noqa: N802
        answer = await self.pipeline.handle("grpc", partial(self._infer, request), failure, status_name)
        if isinstance(answer, Failure):
            await context.abort(answer.code, answer.message, answer.trailers)
        return answer

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:  # noqa: N802
        """Triton's bidirectional stream: every request is answered as ModelInfer answers it, concurrently (so
        that a stream's requests batch together), in the order they finish; an error is the response's
        ``error_message`` and the stream goes on. The stream ends when the client's side has ended and every
        request is answered."""
        answers: asyncio.Queue[Any] = asyncio.Queue()

        async def answer(request: Any) -> None:
            response = await self.pipeline.handle("grpc", partial(self._infer, request), failure, status_name)
            if isinstance(response, Failure):
                failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                               id=request.id)
                await answers.put(pb.ModelStreamInferResponse(error_message=response.message, infer_response=failed))
            else:
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))

        async def read() -> None:
            async with asyncio.TaskGroup() as group:
                async for request in requests:
                    group.create_task(answer(request))
            await answers.put(None)  # every request answered

        reader = asyncio.ensure_future(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()

    async def _infer(self, request: Any) -> Any:
        """One infer request, the steps of REST's (service/oip/routes.py's infer_one)."""
        started = time.perf_counter()
        pipeline, settings = self.pipeline, self.pipeline.settings
        check_model(self.info, request.model_name, request.model_version)
        async with pipeline.admitted("grpc", started) as slot:
            parse = partial(parse_infer, request, settings, self.info)
            return await answer_call(pipeline, slot, parse, partial(encode_infer, info=self.info))

    async def _check_model(self, name: str, version: str, context: Context) -> None:
        try:
            check_model(self.info, name, version)
        except ServiceError as exc:
            answer = failure(exc)
            await context.abort(answer.code, answer.message, answer.trailers)


def status_name(answer: Any) -> str:
    """An answer's status for the metrics: ``OK``, or the failure's code name (``INVALID_ARGUMENT``...)."""
    code: grpc.StatusCode = answer.code if isinstance(answer, Failure) else grpc.StatusCode.OK
    return str(code.name)
