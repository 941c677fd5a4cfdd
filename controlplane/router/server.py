"""The router's gRPC services: `Inference` (public) and `Control` (the controller's).

Thin adapters: they turn messages into `Router` calls and `RouterError`s into statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from spotserve.auth import BearerCheck
from spotserve.v1 import (
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

from .dispatch import Pipeline, PipelineState
from .errors import ErrorKind, RouterError, invalid
from .resume import MODE_NAMES
from .router import Chunk, Router
from .topology import ResumeHint

REQUEST_ID_KEY = "x-spotserve-request-id"   # initial metadata of a resumable Generate
GRPC_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
STATES = {control_pb2.PIPELINE_STATE_SERVING: PipelineState.SERVING,
          control_pb2.PIPELINE_STATE_DRAINING: PipelineState.DRAINING,
          control_pb2.PIPELINE_STATE_GONE: PipelineState.GONE}
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
Context = grpc.aio.ServicerContext[Any, Any]


async def abort(context: Context, exc: RouterError) -> None:
    trailing = (("retry-after", f"{exc.retry_after:.0f}"),) if exc.retry_after else ()
    await context.abort(GRPC_CODES[exc.kind], exc.message, trailing_metadata=trailing)


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, router: Router, api_keys: BearerCheck) -> None:
        self.router = router
        self.api_keys = api_keys

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: Context,
                       ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        await self._check_key(context)
        try:
            prepared = self.router.prepare(
                model=request.model, request_id=request.request_id,
                prompt_token_ids=self._prompt(request), sampling=request.sampling,
                timeout=context.time_remaining(), resumable=request.resumable)
            if request.resumable:   # its id before any token: what a Resume names
                await context.send_initial_metadata(((REQUEST_ID_KEY, prepared.request_id),))
            async for response in _responses(self.router.generate(prepared)):
                yield response
        except RouterError as exc:
            await abort(context, exc)

    async def Resume(self, request: inference_pb2.ResumeRequest,
                     context: Context) -> AsyncIterator[inference_pb2.GenerateResponse]:
        await self._check_key(context)
        try:
            self.router.check_model(request.model)
            chunks = self.router.resume(request.request_id, request.received_tokens,
                                        timeout=context.time_remaining())
            async for response in _responses(chunks):
                yield response
        except RouterError as exc:
            await abort(context, exc)

    async def Cancel(self, request: inference_pb2.CancelGenerateRequest,
                     context: Context) -> inference_pb2.CancelGenerateResponse:
        await self._check_key(context)
        if not request.request_id:
            await abort(context, invalid("request_id", "must not be empty"))
        found = await self.router.cancel(request.request_id)
        return inference_pb2.CancelGenerateResponse(found=found)

    async def _check_key(self, context: Context) -> None:
        if not self.api_keys.allows(_authorization(context)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    def _prompt(self, request: inference_pb2.GenerateRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            return self.router.encode_prompt(request.text)
        if which == "token_ids":
            return list(request.token_ids.ids)
        raise invalid("prompt", "set either text or token_ids")

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: Context) -> inference_pb2.ListModelsResponse:
        limits = self.router.limits
        return inference_pb2.ListModelsResponse(models=[inference_pb2.ModelInfo(
            name=limits.name, max_context=limits.max_context)])

    async def Health(self, request: common_pb2.HealthRequest,
                     context: Context) -> common_pb2.HealthResponse:
        serving = len(self.router.topology.serving())
        status = (common_pb2.HealthResponse.STATUS_SERVING if serving
                  else common_pb2.HealthResponse.STATUS_NOT_SERVING)
        return common_pb2.HealthResponse(status=status,
                                         detail=f"{serving} pipelines serving")


async def _responses(chunks: AsyncIterator[Chunk]
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
    async for chunk in chunks:
        response = inference_pb2.GenerateResponse(
            request_id=chunk.request_id, token_ids=chunk.token_ids, text=chunk.text,
            finish_reason=chunk.finish_reason,  # type: ignore[arg-type]
            tokens=chunk.completion_tokens)
        if chunk.finish_reason:
            response.usage.prompt_tokens = chunk.prompt_tokens
            response.usage.completion_tokens = chunk.completion_tokens
        yield response


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(self, router: Router, token: BearerCheck) -> None:
        self.router = router
        self.token = token

    async def UpdateTopology(self, request: control_pb2.Topology,
                             context: Context) -> control_pb2.TopologyAck:
        await self._check_token(context)
        try:
            pipelines = [_pipeline(i, p) for i, p in enumerate(request.pipelines)]
            hints = [_hint(i, h) for i, h in enumerate(request.resume_hints)]
            epoch = await self.router.update_topology(request.epoch, pipelines, hints)
        except RouterError as exc:
            await abort(context, exc)
        return control_pb2.TopologyAck(epoch=epoch)

    async def Stats(self, request: control_pb2.StatsRequest,
                    context: Context) -> control_pb2.RouterStats:
        await self._check_token(context)
        return self.router.stats()

    async def _check_token(self, context: Context) -> None:
        if not self.token.allows(_authorization(context)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong internal token (authorization: Bearer ...)")


def _pipeline(index: int, info: control_pb2.PipelineInfo) -> Pipeline:
    if info.state not in STATES:
        raise invalid(f"pipelines[{index}].state", "must be SERVING, DRAINING or GONE")
    return Pipeline(info.id, info.driver_address, info.capacity, STATES[info.state],
                    info.max_concurrency)


def _hint(index: int, hint: control_pb2.ResumeHint) -> ResumeHint:
    if not hint.request_id:
        raise invalid(f"resume_hints[{index}].request_id", "must not be empty")
    mode = MODE_NAMES.get(hint.mode, "reprefill")
    if mode == "kv" and not hint.pipeline_id:
        raise invalid(f"resume_hints[{index}].pipeline_id", "mode KV needs the pipeline "
                                                           "that holds the KV cache")
    return ResumeHint(hint.request_id, hint.pipeline_id, mode, hint.kv_tokens)


async def start_grpc(router: Router, address: str, *, internal_token: BearerCheck,
                     api_keys: BearerCheck, inference: bool = True, control: bool = True
                     ) -> tuple[grpc.aio.Server, int]:
    """Start the services asked for (both by default) on `address` (host:port; port 0 =
    any); return the server and the bound port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    if inference:
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceService(router, api_keys), server)
    if control:
        control_pb2_grpc.add_ControlServicer_to_server(
            ControlService(router, internal_token), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
