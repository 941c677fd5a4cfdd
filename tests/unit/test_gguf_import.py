"""`spotserve import-gguf`: a GGUF checkpoint becomes a model folder our engine serves with
the outputs `transformers` gets from the same file; bad files get one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def spotserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotserve.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _one_line_exit_2(done: subprocess.CompletedProcess[str], words: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr


def test_a_file_that_is_not_gguf_gets_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 7)   # the magic, then nothing that parses
    _one_line_exit_2(spotserve("import-gguf", str(junk), "--to", str(tmp_path / "out")),
                     "not a readable GGUF file")
    _one_line_exit_2(spotserve("import-gguf", str(tmp_path / "none.gguf"), "--to",
                               str(tmp_path / "out")), "no such file")


def test_an_unsupported_architecture_gets_one_line(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf", reason="the gguf package is a worker dependency")
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _one_line_exit_2(spotserve("import-gguf", str(path), "--to", str(tmp_path / "out")),
                     "unsupported architecture 'gpt2'")


@pytest.mark.slow
def test_smollm2_answers_like_transformers_on_the_same_file(smollm2: tuple[Path, Path]
                                                            ) -> None:
    """The imported folder, served by our engine (fp32), answers the chat question with the
    tokens `transformers` generates from the GGUF file itself (its own dequantizer and
    tokenizer), and its tokenizer splits text as theirs does."""
    import torch
    import transformers

    from spotserve.tokenizer import ChatMessage, ModelTokenizer
    from spotserve.worker.engine.builder import local_engine
    from spotserve.worker.engine.sequence import SamplingParams
    gguf_file, folder = smollm2
    ours = ModelTokenizer.from_dir(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(gguf_file.parent,
                                                        gguf_file=gguf_file.name)
    for text in ("What is the capital of France?", "digits 12345, two  spaces\n\ttab",
                 "héllo wörld 🙂", "<|im_start|>user\nhi<|im_end|>"):
        assert ours.encode(text, add_special_tokens=False) == \
            theirs.encode(text, add_special_tokens=False), text
    prompt = ours.encode_chat([ChatMessage("user", "What is the capital of France?")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16,
                               do_sample=False)[0, len(prompt):].tolist()
        reference = hf(torch.tensor([prompt])).logits[0, -1]
    engine = local_engine(folder)
    engine.submit("q", prompt, SamplingParams(max_tokens=16))
    got = [e.token_id for e in engine.run()]
    assert got == expected[:len(got)]
    assert "Paris" in ours.decode(got)
    # golden logits of the first generated position
    from spotserve.worker.model.attention import AttentionBatch, SequenceChunk
    model, cache = engine.runner.model, engine.runner.cache
    batch = AttentionBatch.build([SequenceChunk(len(prompt), len(prompt),
                                                range(-(-len(prompt) // 16)))], 16)
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(prompt), batch, cache.layers))[-1]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_local_serves_smollm2_and_the_openai_client_gets_paris(
        smollm2: tuple[Path, Path], tmp_path: Path) -> None:
    """`spotserve up --local --model DIR` on the imported SmolLM2: the router reads its
    chat template (chat_template.jinja), the worker serves it, and a chat completion through
    the openai client answers the question."""
    import select
    import signal

    import openai
    _, folder = smollm2
    process = subprocess.Popen(
        [sys.executable, "-m", "spotserve.cli", "up", "--local", "--model", str(folder),
         "--out", str(tmp_path / "up"), "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 180)
        assert ready, "not serving after 180 s"
        line = process.stdout.readline()
        assert line.startswith("serving"), line
        url = line.split(" on ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)
        chat = client.chat.completions.create(
            model=folder.name, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in (chat.choices[0].message.content or "")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
