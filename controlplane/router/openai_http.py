"""The OpenAI-compatible HTTP API (aiohttp): completions, chat completions, models, and
the operational endpoints /healthz, /readyz and /metrics.

Requests become `Router.prepare` calls; every bad field is a 400 whose message names it,
a full queue is a 429 with Retry-After. A streamed response starts once the first token
is there, so refusals still get their own status code; a failure after that arrives as a
final `error` event.

Resumable streams, a small opt-in extension (docs/router.md): a request sent with the
header `X-Spotserve-Resumable: true` keeps running on its driver when its stream breaks;
every event of its stream carries `id: <tokens received so far>`, and the response header
`X-Spotserve-Request-Id` names it. A client whose stream broke sends the same POST to any
replica with `X-Spotserve-Resume: <request id>` and `Last-Event-ID: <last id it got>`, and
gets exactly the rest. `DELETE /v1/spotserve/requests/{id}` stops one it gives up on.
Clients that know nothing of this see a dropped stream, as from any OpenAI server.

Lenient on purpose, and documented: a body is read as JSON whatever its Content-Type
(`curl -d` without a header sends form-encoded), and fields this server does not read are
ignored as OpenAI's API ignores them, each name logged once at debug level.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from spotserve.auth import BearerCheck
from spotserve.tokenizer import ChatMessage
from spotserve.v1 import common_pb2

from .errors import ErrorKind, RouterError, invalid
from .metrics import CONTENT_TYPE
from .router import Chunk, Router

log = logging.getLogger(__name__)
HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400, ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.RESOURCE_EXHAUSTED: 429, ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504, ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.INTERNAL: 500, ErrorKind.NOT_FOUND: 404, ErrorKind.ABORTED: 409,
}
RESUMABLE_HEADER = "X-Spotserve-Resumable"
RESUME_HEADER = "X-Spotserve-Resume"
REQUEST_ID_HEADER = "X-Spotserve-Request-Id"
FINISH: dict[int, str] = {common_pb2.FINISH_REASON_STOP: "stop",
                          common_pb2.FINISH_REASON_LENGTH: "length"}
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = ("system", "user", "assistant", "tool", "developer")
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "logit_bias", "suffix", "tools",
               "response_format")
# Fields read (or refused as unsupported) above; any other is ignored, as OpenAI's API does,
# and logged once per name at debug level (a misspelt field then shows in the log).
KNOWN = frozenset({"model", "prompt", "messages", "max_tokens", "max_completion_tokens",
                   "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "n", "stream", "stream_options", "presence_penalty",
                   "frequency_penalty", "user", *UNSUPPORTED})
_ignored: set[str] = set()
ROUTER_KEY: web.AppKey[Router] = web.AppKey("router", Router)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 8 * 1024 * 1024  # bytes of a request body


def error_body(exc: RouterError) -> dict[str, Any]:
    kind = "invalid_request_error" if exc.kind is ErrorKind.INVALID_ARGUMENT else exc.kind.value
    return {"error": {"message": exc.message, "type": kind, "param": exc.field,
                      "code": HTTP_STATUS[exc.kind]}}


def error_response(exc: RouterError) -> web.Response:
    headers = {"Retry-After": f"{exc.retry_after:.0f}"} if exc.retry_after else None
    return web.json_response(error_body(exc), status=HTTP_STATUS[exc.kind], headers=headers)


# ---- request parsing (pure) ---------------------------------------------------------------

def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise invalid(name, f"must be {what}, got {json.dumps(value)[:40]}")
    return value


def parse_sampling(body: dict[str, Any], *, default_max_tokens: int) -> common_pb2.SamplingParams:
    """OpenAI (and vLLM extension) sampling fields → SamplingParams; type errors only."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise invalid(name, "is not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), "a number") not in (None, 0):
            raise invalid(name, "is not supported by this server (only 0)")
    if _get(body, "n", (int,), "an integer") not in (None, 1):
        raise invalid("n", "only n = 1 is supported")
    max_tokens = _get(body, "max_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", (int,), "an integer")
    sampling = common_pb2.SamplingParams(
        max_tokens=_int32("max_tokens", default_max_tokens if max_tokens is None
                          else max_tokens))
    for name in ("temperature", "top_p"):
        value = _get(body, name, (int, float), "a number")
        if value is not None:
            setattr(sampling, name, float(value))
    top_k = _get(body, "top_k", (int,), "an integer")
    if top_k is not None:
        sampling.top_k = 0 if top_k == -1 else _int32("top_k", top_k)  # vLLM: -1 = no limit
    seed = _get(body, "seed", (int,), "an integer")
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise invalid("seed", "must be in [0, 2^64)")
        sampling.seed = seed
    sampling.stop.extend(_stop_strings(body.get("stop")))
    stop_ids = _get(body, "stop_token_ids", (list,), "a list of token ids") or []
    sampling.stop_token_ids.extend(_token_ids("stop_token_ids", stop_ids))
    sampling.ignore_eos = bool(_get(body, "ignore_eos", (bool,), "true or false"))
    return sampling


def _int32(name: str, value: int) -> int:
    if not -(2**31) <= value < 2**31:
        raise invalid(name, f"out of range: {value}")
    return value


def _unicode(name: str, text: str) -> str:
    """`text` as given, if it is valid Unicode: JSON may carry a lone UTF-16 surrogate
    (\\ud800), which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(name, "contains a lone UTF-16 surrogate (\\ud800-\\udfff): not valid "
                            "Unicode") from None
    return text


def _stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [_unicode("stop", value)]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [_unicode(f"stop[{i}]", s) for i, s in enumerate(value)]
    raise invalid("stop", "must be a string or a list of strings")


def _token_ids(name: str, value: list[Any]) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise invalid(name, "must be a list of integer token ids")
    return [_int32(name, t) for t in value]


def parse_prompt(router: Router, value: Any) -> list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return router.encode_prompt(_unicode("prompt", value))
    if isinstance(value, list) and (not value or isinstance(value[0], int)):
        return _token_ids("prompt", value)
    if value is None:
        raise invalid("prompt", "is required")
    raise invalid("prompt", "must be a string or a list of token ids (one prompt per request)")


def parse_messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty list of {role, content} objects")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(where, "must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        messages.append(ChatMessage(role, _content(f"{where}.content", message.get("content"))))
    return messages


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return _unicode(where, content)
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise invalid(where, "only text content parts are supported")
            parts.append(_unicode(where, part["text"]))
        return "".join(parts)
    raise invalid(where, "must be a string or a list of text parts")


# ---- handlers -----------------------------------------------------------------------------

async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as JSON, whatever its Content-Type says (`curl -d` sends form-encoded)."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("body", "is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    for name in body.keys() - KNOWN - _ignored:
        _ignored.add(name)
        log.debug("ignoring the request field %r (not one this server reads)", name)
    return body


async def completions(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    body = await _json_body(request)
    if request.headers.get(RESUME_HEADER):
        return await _resume(request, body, chat=False)
    prompt_ids = parse_prompt(router, body.get("prompt"))
    sampling = parse_sampling(body, default_max_tokens=DEFAULT_COMPLETION_TOKENS)
    return await _respond(request, body, prompt_ids, sampling, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    body = await _json_body(request)
    if request.headers.get(RESUME_HEADER):
        return await _resume(request, body, chat=True)
    messages = parse_messages(body.get("messages"))
    if not router.tokenizer.has_chat_template:
        raise invalid("messages", "the model has no chat template; use /v1/completions")
    try:
        prompt_ids = router.tokenizer.encode_chat(messages)
    except Exception as exc:  # the template's own raise_exception, or a template bug
        raise invalid("messages", f"the chat template rejected them: {exc}") from None
    room = max(router.limits.max_context - len(prompt_ids), 1)
    sampling = parse_sampling(body, default_max_tokens=room)
    return await _respond(request, body, prompt_ids, sampling, chat=True)


def _flag(request: web.Request, name: str) -> bool:
    value = request.headers.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise invalid(name, f"must be true or false, got {value[:20]!r}")


async def _respond(request: web.Request, body: dict[str, Any], prompt_ids: list[int],
                   sampling: common_pb2.SamplingParams, *, chat: bool) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    model = _get(body, "model", (str,), "a string") or ""
    resumable = _flag(request, RESUMABLE_HEADER)
    prepared = router.prepare(model=model, request_id=request.headers.get("X-Request-Id", ""),
                              prompt_token_ids=prompt_ids, sampling=sampling,
                              resumable=resumable)
    return await _reply(request, body, prepared.request_id, router.generate(prepared),
                        chat=chat, resumable=resumable, received=0)


async def _resume(request: web.Request, body: dict[str, Any], *,
                  chat: bool) -> web.StreamResponse:
    """A resumable request's stream again, after the `Last-Event-ID` tokens the client
    has (0, or absent: all of it). The body is the original request's; only `model`,
    `stream` and `stream_options` are read from it: the request itself comes from its
    driver."""
    router = request.app[ROUTER_KEY]
    request_id = request.headers[RESUME_HEADER].strip()
    last = request.headers.get("Last-Event-ID", "").strip() or "0"
    if not last.isdigit():
        raise invalid("Last-Event-ID", f"must be the last event id received (a token "
                                       f"count), got {last[:20]!r}")
    router.check_model(_get(body, "model", (str,), "a string") or "")
    chunks = router.resume(request_id, int(last))
    return await _reply(request, body, request_id, chunks, chat=chat, resumable=True,
                        received=int(last))


async def _reply(request: web.Request, body: dict[str, Any], request_id: str,
                 chunks: AsyncGenerator[Chunk, None], *, chat: bool, resumable: bool,
                 received: int) -> web.StreamResponse:
    router = request.app[ROUTER_KEY]
    stream = bool(_get(body, "stream", (bool,), "true or false"))
    shape = _Shape(request_id, router.limits.name, chat, resumable=resumable)
    try:
        first = await anext(chunks)  # refusals before the first token keep their status
        if stream:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await _stream(request, shape, first, chunks, usage, received)
        response = web.json_response(shape.whole([first, *[c async for c in chunks]]))
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    finally:
        await chunks.aclose()


async def _stream(request: web.Request, shape: _Shape, first: Chunk,
                  chunks: AsyncIterator[Chunk], include_usage: bool,
                  received: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           REQUEST_ID_HEADER: first.request_id})
    await response.prepare(request)
    last = first
    try:
        await _send(response, shape.delta(first, is_first=received == 0), shape.event_id(first))
        async for chunk in chunks:
            last = chunk
            await _send(response, shape.delta(chunk, is_first=False), shape.event_id(chunk))
        if include_usage:
            await _send(response, shape.usage_chunk(last))
    except RouterError as exc:
        await _send(response, error_body(exc))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, payload: dict[str, Any],
                event_id: str | None = None) -> None:
    head = f"id: {event_id}\n".encode() if event_id is not None else b""
    await response.write(head + b"data: " + json.dumps(payload).encode() + b"\n\n")


class _Shape:
    """The OpenAI response objects for one request."""

    def __init__(self, request_id: str, model: str, chat: bool, *,
                 resumable: bool = False) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.chat = chat
        self.resumable = resumable
        self.created = int(time.time())

    def event_id(self, chunk: Chunk) -> str | None:
        """A resumable stream's event id: the tokens the client has after this event,
        which is what it sends back as `Last-Event-ID` to resume."""
        return str(chunk.completion_tokens) if self.resumable else None

    def _base(self, suffix: str = "") -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created,
                "model": self.model}

    def delta(self, chunk: Chunk, *, is_first: bool) -> dict[str, Any]:
        finish = FINISH.get(chunk.finish_reason)
        if self.chat:
            delta: dict[str, Any] = {"content": chunk.text}
            if is_first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": chunk.text, "finish_reason": finish,
                      "logprobs": None}
        return {**self._base(".chunk" if self.chat else ""), "choices": [choice]}

    def usage_chunk(self, last: Chunk) -> dict[str, Any]:
        return {**self._base(".chunk" if self.chat else ""), "choices": [],
                "usage": _usage(last)}

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        finish = FINISH.get(chunks[-1].finish_reason)
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                      "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._base(), "choices": [choice], "usage": _usage(chunks[-1])}


def _usage(chunk: Chunk) -> dict[str, int]:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def _model_card(request: web.Request) -> dict[str, Any]:
    limits = request.app[ROUTER_KEY].limits
    return {"id": limits.name, "object": "model", "created": 0, "owned_by": "spotserve",
            "max_model_len": limits.max_context}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request)]})


async def model(request: web.Request) -> web.Response:
    card, wanted = _model_card(request), request.match_info["model"]
    if wanted != card["id"]:
        return _openai_error(404, f"The model '{wanted}' does not exist; this server serves "
                                  f"'{card['id']}'", "model", "model_not_found")
    return web.json_response(card)


def _openai_error(status: int, message: str, param: str | None = None,
                  code: str | None = None) -> web.Response:
    """An error in OpenAI's JSON shape, for what the router's own errors do not cover (an
    unknown path, a wrong method, a body too large)."""
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": param, "code": code}}, status=status)


async def cancel(request: web.Request) -> web.Response:
    """Stop a resumable request the client gives up on (its driver would otherwise run it
    to its end with no one reading)."""
    request_id = request.match_info["request_id"]
    if not await request.app[ROUTER_KEY].cancel(request_id):
        raise RouterError(ErrorKind.NOT_FOUND, f"request {request_id!r} is not running",
                          field="request_id")
    return web.json_response({"id": request_id, "cancelled": True})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    if router.ready():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="no pipeline is serving\n")


async def metrics(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    router.stats()  # refreshes the gauges computed on demand
    return web.Response(body=router.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def build_app(router: Router, api_keys: BearerCheck) -> web.Application:
    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") and \
                not api_keys.allows(request.headers.get("Authorization")):
            return error_response(RouterError(ErrorKind.UNAUTHENTICATED,
                                              "missing or wrong API key"))
        try:
            return await handler(request)
        except RouterError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {404: f"Invalid URL ({request.method} {request.path})",
                       405: f"Method {request.method} is not allowed on {request.path}",
                       413: f"The request body is larger than {MAX_BODY} bytes"}.get(
                           exc.status, exc.reason)
            return _openai_error(exc.status, message)

    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # ids may hold a slash
    app.router.add_delete("/v1/spotserve/requests/{request_id}", cancel)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
