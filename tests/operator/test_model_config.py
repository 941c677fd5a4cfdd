"""An LLMService naming a Hugging Face repository, or a URL, that is no built-in model: the
operator fetches its config.json (only that) and plans from the checkpoint's own shape."""

from __future__ import annotations

import copy

import pytest

from spotserve.errors import SpotserveError
from spotserve.operator.k8s.model_config import ConfigFetcher
from spotserve.operator.k8s.spec import ServiceSpec, hub_source, url_source, validate

from .fake_hub import GATED, QWEN25_7B, archive, fake_hub, https_archives

POOL = {"name": "l40s", "capacityType": "spot", "instanceType": "g6e.12xlarge",
        "maxInstances": 4}


def spec(repo: str) -> dict[str, object]:
    return {"model": {"huggingFace": {"repoId": repo}}, "gpuPools": [copy.deepcopy(POOL)],
            "instances": {"min": 1, "max": 4}, "serving": {"maxBatch": 4}}


@pytest.mark.parametrize(("repo", "family", "layers", "kv_heads"), [
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", 32, 8),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2", 28, 4),
    ("google/gemma-7b-it", "gemma", 28, 16),
])
async def test_a_repository_that_is_no_built_in_plans_from_its_config(
        repo: str, family: str, layers: int, kv_heads: int) -> None:
    assert isinstance(validate(spec(repo)), list)   # by name alone: unknown
    assert hub_source(spec(repo)["model"]) == (repo, "main")   # type: ignore[arg-type]
    async with fake_hub() as hub:
        fetcher = ConfigFetcher(hub.url, token="")
        config = await fetcher.hugging_face(repo)
        assert await fetcher.hugging_face(repo) is config and fetcher.fetches == 1   # kept
    result = validate(spec(repo), fetched=config)
    assert isinstance(result, ServiceSpec), result
    model = result.model
    assert (model.family, model.num_layers, model.num_kv_heads, model.dtype) == (
        family, layers, kv_heads, "bfloat16")
    assert result.settings.model == model     # what the controller plans with


async def test_a_built_in_name_is_not_fetched() -> None:
    assert hub_source(spec("meta-llama/Llama-3.1-8B-Instruct")["model"]) is None  # type: ignore[arg-type]


async def test_fetch_failures_say_why_and_are_not_kept() -> None:
    async with fake_hub() as hub:
        fetcher = ConfigFetcher(hub.url, token="")
        with pytest.raises(SpotserveError, match=r"gated or private.*HF_TOKEN"):
            await fetcher.hugging_face(GATED)
        with pytest.raises(SpotserveError, match=r"no config\.json there"):
            await fetcher.hugging_face("acme/nothing")
        with pytest.raises(SpotserveError, match=r"no config\.json there"):
            await fetcher.hugging_face("Qwen/Qwen2.5-7B-Instruct", "v9")
        with_token = ConfigFetcher(hub.url, token="hf_good")
        assert (await with_token.hugging_face(GATED))["num_hidden_layers"] == 32
        assert hub.requests[-1][1] == "Bearer hf_good"
        assert fetcher.fetches == 3   # every failure was a request: none was kept
    gone = ConfigFetcher(hub.url, token="", timeout=5)
    with pytest.raises(SpotserveError, match="could not be fetched"):
        await gone.hugging_face("Qwen/Qwen2.5-7B-Instruct")


async def test_why_a_config_could_not_be_had_reaches_the_problem() -> None:
    result = validate(spec("acme/nothing"), fetch_error="acme/nothing@main: no config.json")
    assert isinstance(result, list)
    assert "no config.json" in result[0].message
    async with fake_hub() as hub:
        config = await ConfigFetcher(hub.url, token="").hugging_face("openai-community/gpt2")
    result = validate(spec("openai-community/gpt2"), fetched=config)
    assert isinstance(result, list)
    assert "unsupported architecture" in result[0].message and "GPT2" in result[0].message


async def test_a_url_source_plans_from_the_config_in_its_archive(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An https archive of Qwen2.5-7B (no built-in name in its URL): the operator reads
    the archive's config.json (and no further) and plans from its shape; a URL whose
    config cannot be had says why in the problem."""
    with https_archives({"/models/qwen.tar.gz": archive(QWEN25_7B)}, monkeypatch) as base:
        url = f"{base}/models/qwen.tar.gz"
        service = {**spec("unused"), "model": {"url": url}}
        assert isinstance(validate(service), list)   # by its URL alone: unknown
        assert url_source(service["model"]) == url   # type: ignore[arg-type]
        fetcher = ConfigFetcher(token="")
        config = await fetcher.url(url)
        assert await fetcher.url(url) is config and fetcher.fetches == 1   # kept
        result = validate(service, fetched=config)
        assert isinstance(result, ServiceSpec), result
        assert (result.model.family, result.model.num_layers, result.model.name) == (
            "qwen2", 28, "qwen")
        missing = f"{base}/models/gone.tar.gz"
        with pytest.raises(SpotserveError, match="404") as caught:
            await fetcher.url(missing)
        problems = validate({**service, "model": {"url": missing}}, fetch_error=str(caught.value))
        assert isinstance(problems, list) and "404" in problems[0].message
    named = {"url": "s3://bucket/weights/", "servedName": "meta-llama/Llama-3.1-8B-Instruct"}
    assert url_source(named) is None                 # a built-in name: nothing fetched
