"""Clients for the router tests: gRPC Generate, Control and expected outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from spotserve.operator.router.app import RouterApp
from spotserve.tokenizer import ModelTokenizer
from spotserve.v1 import (
    common_pb2,
    control_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

from .conftest import TOKEN
from .fake_worker import fake_completion


@dataclass
class Streamed:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    completion_tokens: int = 0
    messages: int = 0


async def generate(app: RouterApp, prompt: str, max_tokens: int, request_id: str = "",
                   **sampling: object) -> Streamed:
    """Stream one request through the router's gRPC Inference service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            text=prompt, request_id=request_id,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling))  # type: ignore[arg-type]
        out = Streamed()
        async for message in stub.Generate(request, timeout=30):
            out.token_ids.extend(message.token_ids)
            out.text += message.text
            out.messages += 1
            if message.finish_reason:
                out.finish_reason = message.finish_reason
                out.completion_tokens = message.usage.completion_tokens
        return out


def expected(tokenizer: ModelTokenizer, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """What an uninterrupted run produces: the double's tokens and their text."""
    ids = fake_completion(tokenizer.encode(prompt), max_tokens, tokenizer.vocab_size)
    return ids, tokenizer.decode(ids)


def control(app: RouterApp) -> tuple[grpc.aio.Channel, control_pb2_grpc.ControlStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.control_port}")
    return channel, control_pb2_grpc.ControlStub(channel)


AUTH = (("authorization", f"Bearer {TOKEN}"),)
