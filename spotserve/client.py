"""A gRPC client of the router that survives the loss of the replica it streams from.

`ResumingClient.generate` sends a resumable `Generate` to one router replica; when the
stream breaks (the replica's process or node died, the connection dropped), it calls
`Resume` on the next replica with the number of tokens it has, and goes on. Its caller
sees one stream: every token once, in order, as if nothing happened. The id is the
caller's (or the one the router names in the call's initial metadata, before any token),
so a break before the first token resumes too. Only errors that no other replica would
answer differently reach the caller.

    client = ResumingClient(["router-0:50051", "router-1:50051"], api_key="...")
    request = inference_pb2.GenerateRequest(text="...", sampling=...)
    async for message in client.generate(request):
        ...

With a Kubernetes Service in front of the replicas, one address is enough: each new
connection may land on another replica.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from spotserve.v1 import inference_pb2, inference_pb2_grpc

REQUEST_ID_KEY = "x-spotserve-request-id"
# A stream broken by its replica (or the way to it): try the next replica.
BROKEN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED})


@dataclass
class Progress:
    """What the caller has of one request: its id, the tokens received, and each time its
    stream broke (`time.monotonic()`, the replica's address) and was taken up again."""

    request_id: str = ""
    tokens: int = 0
    breaks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def resumes(self) -> int:
        return len(self.breaks)


class ResumingClient:
    def __init__(self, addresses: Sequence[str], *, api_key: str | None = None,
                 retry_for: float = 60.0, retry_every: float = 0.2,
                 spread: bool = True) -> None:
        if not addresses:
            raise ValueError("ResumingClient needs at least one router address")
        self.addresses = list(addresses)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.retry_for, self.retry_every = retry_for, retry_every
        self._channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        self._stubs = [inference_pb2_grpc.InferenceStub(c) for c in self._channels]
        self._next = itertools.count()
        self.spread = spread   # start requests round the replicas, or always at the first

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def generate(self, request: inference_pb2.GenerateRequest,
                       progress: Progress | None = None, timeout: float | None = None
                       ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """The request's stream, taken up on another replica as often as it breaks
        (within `retry_for` seconds of the last message). `progress` (optional) shows the
        caller the id, the tokens so far and the number of resumes."""
        progress = progress if progress is not None else Progress()
        request = inference_pb2.GenerateRequest.FromString(request.SerializeToString())
        request.resumable = True
        progress.request_id = request.request_id
        deadline = time.monotonic() + timeout if timeout is not None else None
        replica = next(self._next) % len(self._stubs) if self.spread else 0
        fresh, broke_at = True, None
        while True:
            stub = self._stubs[replica]
            if fresh:
                request.request_id = progress.request_id
                call = stub.Generate(request, metadata=self.metadata,
                                     timeout=_left(deadline))
            else:
                call = stub.Resume(inference_pb2.ResumeRequest(
                    model=request.model, request_id=progress.request_id,
                    received_tokens=progress.tokens), metadata=self.metadata,
                    timeout=_left(deadline))
            try:
                if fresh and not progress.request_id:
                    named = dict(await call.initial_metadata() or ()).get(REQUEST_ID_KEY)
                    progress.request_id = str(named or "")
                async for message in call:
                    broke_at = None
                    progress.request_id = message.request_id
                    progress.tokens = message.tokens
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                # NOT_FOUND before any token: the replica died before a driver had it
                # (it was queued); send it again. After tokens it is lost: say so.
                lost_early = code == grpc.StatusCode.NOT_FOUND and progress.tokens == 0
                if code not in BROKEN and not lost_early:
                    raise
                now = time.monotonic()
                progress.breaks.append((now, self.addresses[replica]))
                broke_at = broke_at or now
                if now - broke_at > self.retry_for or (deadline and now > deadline):
                    raise
                fresh = lost_early or not progress.request_id
            finally:
                call.cancel()
            replica = (replica + 1) % len(self._stubs)
            await asyncio.sleep(self.retry_every)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
