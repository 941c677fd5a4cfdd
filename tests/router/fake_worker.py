"""A TEST DOUBLE of a pipeline driver's `Worker` service: no model, deterministic tokens.

Token i of a request is `fake_token(prompt, i)`, so any pipeline produces the same tokens
for the same request, and a resumed request (from "KV" or by "re-prefill") continues exactly
where it stopped. Enough of the contract for the router: Submit (with resume state,
detachable or not; fresh ones refused beyond `max_batch` running, as the driver does),
Cancel, Drain (pause after k more tokens, keeping the "KV"), Lookup and Attach (through
the real worker's `Journal`), and the shared token. `kv` holds the requests
a drain paused; a test moves an entry to another double to play KV migration. Run as a
process with `python -m tests.router.fake_worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import zlib
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker.journal import Journal, Record, relay

FR = common_pb2.FinishReason
FIRST_TOKEN = 16  # ids below are left to special tokens


def fake_token(prompt: Sequence[int], position: int, vocab_size: int) -> int:
    base = zlib.crc32(array("i", prompt).tobytes())
    mixed = ((base ^ (position * 2654435761)) * 2246822519) & 0xFFFFFFFF
    return FIRST_TOKEN + mixed % (vocab_size - FIRST_TOKEN)


def fake_completion(prompt: Sequence[int], max_tokens: int, vocab_size: int) -> list[int]:
    return [fake_token(prompt, i, vocab_size) for i in range(max_tokens)]


@dataclass
class Submission:
    request_id: str
    mode: int            # ResumeMode of the submission (0 = fresh)
    resumed_at: int      # committed tokens it continued after


@dataclass
class _Running:
    prompt: list[int]
    generated: list[int]
    budget: int | None = None  # tokens left before a drain pauses it
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, *, vocab_size: int, step_seconds: float = 0.005,
                 token: str | None = None, max_context: int = 1 << 30,
                 max_batch: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.max_batch = max_batch   # the real driver's cap on fresh submissions
        self.peak = 0                # most requests it ever ran at once
        self.max_context = max_context
        self.step_seconds = step_seconds
        self.token = token
        self.kv: dict[str, tuple[list[int], list[int]]] = {}
        self.submissions: list[Submission] = []
        self.running: dict[str, _Running] = {}
        self.journal = Journal()   # the real worker's: what Lookup and Attach serve
        self.drained = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def Submit(self, request: worker_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.TokenDelta]:
        await self._check(context)
        if self.drained:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "drained")
        done = list(request.resume.generated_token_ids)
        prompt = list(request.prompt_token_ids)
        if len(prompt) + request.sampling.max_tokens > self.max_context:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"exceeds the context length {self.max_context}")
        if request.resume.mode == common_pb2.RESUME_MODE_KV:
            kept = self.kv.pop(request.request_id, None)
            if kept is None or kept != (prompt, done):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"no KV cache for {request.request_id}")
        if request.request_id in self.running:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request {request.request_id} is already running here")
        fresh = not done and request.resume.mode == common_pb2.RESUME_MODE_UNSPECIFIED
        if fresh and self.max_batch is not None and len(self.running) >= self.max_batch:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the pipeline is full ({len(self.running)} of "
                                f"{self.max_batch} running)")
        self.submissions.append(Submission(request.request_id, request.resume.mode, len(done)))
        record, owner = self.journal.open(request)
        state = _Running(prompt, done)
        self.running[request.request_id] = state
        self.peak = max(self.peak, len(self.running))
        task = asyncio.get_running_loop().create_task(self._generate(request, state, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        async for delta in relay(context, self.journal.stream(record, owner, len(done),
                                                              self._cancel)):
            yield delta

    async def _generate(self, request: worker_pb2.SubmitRequest, state: _Running,
                        record: Record) -> None:
        """The "engine": a token every step into the request's record."""
        sampling = request.sampling
        try:
            while True:
                position = len(state.generated)
                if state.cancelled.is_set():
                    record.add(position, None, FR.FINISH_REASON_CANCELLED)
                    return
                if state.budget is not None and state.budget <= 0:
                    self.kv[request.request_id] = (state.prompt, list(state.generated))
                    record.add(position, None, FR.FINISH_REASON_PAUSED)
                    return
                await asyncio.sleep(self.step_seconds)
                token = fake_token(state.prompt, position, self.vocab_size)
                state.generated.append(token)
                if state.budget is not None:
                    state.budget -= 1
                finish = FR.FINISH_REASON_UNSPECIFIED
                if token in sampling.stop_token_ids:
                    finish = FR.FINISH_REASON_STOP
                elif len(state.generated) >= sampling.max_tokens:
                    finish = FR.FINISH_REASON_LENGTH
                record.add(position, token, finish)
                if finish:
                    return
        finally:
            if self.running.get(request.request_id) is state:
                del self.running[request.request_id]

    def _cancel(self, request_id: str) -> bool:
        state = self.running.get(request_id)
        if state is not None:
            state.cancelled.set()
        return state is not None

    async def Cancel(self, request: worker_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext) -> worker_pb2.CancelResponse:
        await self._check(context)
        found = self.journal.drop(request.request_id)
        return worker_pb2.CancelResponse(found=self._cancel(request.request_id) or found)

    async def Lookup(self, request: worker_pb2.LookupRequest,
                     context: grpc.aio.ServicerContext) -> worker_pb2.LookupResponse:
        await self._check(context)
        return self.journal.lookup(request.request_id)

    async def Attach(self, request: worker_pb2.AttachRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.TokenDelta]:
        await self._check(context)
        async for delta in relay(context, self.journal.take_over(request.request_id,
                                                                 self._cancel)):
            yield delta

    async def Drain(self, request: worker_pb2.DrainRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.DrainResponse:
        await self._check(context)
        self.drained = True
        for state in self.running.values():
            state.budget = request.steps
        return worker_pb2.DrainResponse(steps_run=request.steps)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        if self.token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")


async def start_fake_worker(host: str, worker: FakeWorker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, f"{host}:{port}"


async def _main(args: argparse.Namespace) -> None:
    worker = FakeWorker(vocab_size=args.vocab_size, step_seconds=args.step, token=args.token,
                        max_batch=args.max_batch)
    server, address = await start_fake_worker(args.host, worker)
    print(f"fake worker listening {address}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Test double of a pipeline driver.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--step", type=float, default=0.005, help="seconds per token")
    parser.add_argument("--token", default=None)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="refuse fresh submissions beyond this many running")
    asyncio.run(_main(parser.parse_args()))
