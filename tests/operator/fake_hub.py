"""A stand-in for the Hugging Face Hub on loopback: `/{repo}/resolve/{revision}/config.json`
for a few repositories (their public configs' shapes), 401 for a gated one, 404 else; and
an https server of model archives, for `url` sources."""

from __future__ import annotations

import contextlib
import json
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.served_files import serve_files, tar_of

# the shapes of the public config.json files (values that matter to the planner and engine)
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 131072,
    "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645}
GEMMA_7B = {   # its hidden_act is an old key transformers ignores (GELU, tanh, is used)
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 3072,
    "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 256, "vocab_size": 256000,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "hidden_act": "gelu", "torch_dtype": "bfloat16", "bos_token_id": 2, "eos_token_id": 1}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 12}
REPOS: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-Instruct-v0.3": MISTRAL_7B_V03,
    "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B,
    "google/gemma-7b-it": GEMMA_7B,
    "openai-community/gpt2": GPT2,
}
GATED = "acme/gated-model"


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []   # (path, Authorization)
        self.url = ""

    async def config(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.get("Authorization")))
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo == GATED and request.headers.get("Authorization") != "Bearer hf_good":
            return web.Response(status=401)
        if repo == GATED:
            return web.json_response(MISTRAL_7B_V03)
        if repo not in REPOS or request.match_info["revision"] != "main":
            return web.Response(status=404)
        return web.json_response(REPOS[repo])


@contextlib.asynccontextmanager
async def fake_hub() -> AsyncIterator[FakeHub]:
    hub = FakeHub()
    app = web.Application()
    app.router.add_get("/{org}/{name}/resolve/{revision}/config.json", hub.config)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hub.url = f"http://127.0.0.1:{port}"
    try:
        yield hub
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def https_archives(archives: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An https server on loopback with a certificate of a test CA, which this process
    trusts (SSL_CERT_FILE), as the operator trusts a real server's."""
    import trustme

    ca = trustme.CA()
    ca_file = str(Path(tempfile.mkdtemp()) / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = serve_files(archives, context)
    try:
        yield f"https://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def archive(config: dict[str, Any]) -> bytes:
    return tar_of({"qwen/config.json": json.dumps(config).encode(),
                   "qwen/model-00001-of-00004.safetensors": b"\0" * 65536})
