"""The body of `spotserve demo` (see `demo_cli`): take the model (SmolLM2-135M-Instruct by
default), play the trace while chat questions stream through the router, print answers from
before, across and after the migrations, then the summary; write the JSON report and the
PNG timeline."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from spotserve.catalog import Catalog
from spotserve.traces import load_trace
from spotserve.v1 import common_pb2

from .cloud import DEFAULT_NO_NOTICE, DEFAULT_TRACE, KILL, NOTICE, Script, script
from .model_choice import local_model
from .report import plot, summary, summary_text, write_json
from .runner import CATALOG, RequestRecord, RunOptions, RunResult, run_local
from .tiny_model import is_tiny_llama

TARGET_SECONDS = 120.0
# What the demo asks a chat model: short questions with short, checkable answers.
QUESTIONS = (
    "What is the capital of France?",
    "What is the largest mammal?",
    "Name the three primary colors.",
    "How many days are there in a week?",
    "What is the chemical symbol for water?",
    "What is the capital of Germany?",
    "What is the boiling point of water in Celsius?",
    "What is the opposite of hot?",
    "Which ocean is the largest?",
    "What language is spoken in Brazil?",
    "What is 2 plus 2?",
    "What is the capital of Japan?",
)
# The load, by kind of model: (requests/s, tokens at most per answer). A chat model's
# answers end at their end of turn; the random model's run to max_tokens.
CHAT_LOAD, TOKEN_LOAD = (0.8, 40), (4.0, 128)


def load_cloud(args: argparse.Namespace) -> Script:
    """The script to play: the built-in trace, or a trace file fitted into ~2 minutes."""
    if args.trace is None:
        return script(DEFAULT_TRACE, args.compression or 1.0, args.grace,
                      args.no_notice or DEFAULT_NO_NOTICE)
    trace = load_trace(args.trace)
    compression = args.compression or max(1.0, trace.end_s / TARGET_SECONDS)
    return script(trace, compression, args.grace, args.no_notice)


def run_demo(args: argparse.Namespace) -> int:
    Catalog.load(CATALOG).instance(args.instance_type)  # a bad type fails before anything
    cloud = load_cloud(args)
    out: Path = args.out.resolve()  # workers run elsewhere: every path they get is absolute
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    model = local_model(args.model, out, say)
    chat = _has_chat_template(model) and not is_tiny_llama(model)
    rate, max_tokens = CHAT_LOAD if chat else TOKEN_LOAD
    rate, max_tokens = args.rate or rate, args.max_tokens or max_tokens
    say(f"playing {cloud.source}: {len(cloud.kills(True))} preemptions with notice "
        f"({args.grace:g} s grace), {len(cloud.kills(False))} without, over "
        f"{cloud.end:.0f} s; {rate:g} requests/s, " +
        (f"chat questions to {model.name}, answers of at most {max_tokens} tokens" if chat
         else f"random prompts, {max_tokens} tokens each"))
    answers = LiveAnswers(cloud, say)
    options = RunOptions(model_dir=model, workdir=out, script=cloud,
                         instance_type=args.instance_type, grace=args.grace, rate=rate,
                         prompt_tokens=args.prompt_tokens, max_tokens=max_tokens,
                         restart_at=args.restart_controller_at,
                         reference=not args.no_reference, say=say,
                         questions=QUESTIONS if chat else (),
                         on_done=answers.done if chat else None)
    result = asyncio.run(run_local(options))
    if chat:
        print(answers_text(result, cloud))
    numbers = summary(result)
    numbers["total_seconds"] = round(time.monotonic() - started, 1)
    report, timeline = out / "report.json", out / "timeline.png"
    write_json(report, result, numbers)
    plot(timeline, result)
    print("\n=== spotserve demo summary ===")
    print(summary_text(numbers))
    print(f"report      {report}\ntimeline    {timeline}\nlogs        {out / 'logs'}, "
          f"{out / 'controller'}")
    good = numbers["failed"] == 0 and (args.no_reference or numbers["outputs_correct"])
    return 0 if good else 1


def _has_chat_template(model: Path) -> bool:
    from spotserve.tokenizer import chat_template

    return chat_template(model) is not None


def _upheavals(cloud: Script) -> list[tuple[float, str]]:
    """When the cloud took something away, and what: each notice and each kill."""
    noticed = {e.instance for e in cloud.events if e.kind == NOTICE}
    return sorted((e.at, f"the termination notice for {e.instance}" if e.kind == NOTICE
                   else f"{e.instance}'s termination" if e.instance in noticed
                   else f"{e.instance}'s termination without notice")
                  for e in cloud.events if e.kind in (NOTICE, KILL))


def _clip(record: RequestRecord, width: int = 110) -> str:
    """The answer on one line, at most `width` characters; "…" where it was cut."""
    text = " ".join(record.answer.split())
    if len(text) > width:
        return text[:width - 1] + "…"
    return text + (" …" if record.finish == common_pb2.FINISH_REASON_LENGTH else "")


class LiveAnswers:
    """Prints answers as they come: the first one, then one whose request was in flight
    across each notice or kill (a question asked before the cloud moved, answered after),
    a question not shown yet where one is."""

    def __init__(self, cloud: Script, say: Callable[[str], None]) -> None:
        self.say = say
        self.pending = _upheavals(cloud)
        self.first = True
        self.shown: set[str] = set()

    def done(self, record: RequestRecord) -> None:
        if record.error:
            return
        spans = [(t, what) for t, what in self.pending if record.sent <= t <= record.done]
        # a question already shown waits for another, until the next upheaval is near
        repeat = record.question in self.shown and not any(
            t + 10.0 < record.done for t, _ in spans)
        if not (self.first or spans) or (repeat and not self.first):
            return
        self.first = False
        self.shown.add(record.question)
        self.pending = [(t, what) for t, what in self.pending if t > record.done]
        across = f", in flight across {spans[0][1]}" if spans else ""
        self.say(f"[{record.done:6.1f}s] Q: {record.question}\n"
                 f"          A: {_clip(record)}  ({record.request_id}, "
                 f"{len(record.tokens)} tokens in {record.latency:.1f}s{across})")


def answers_text(result: RunResult, cloud: Script) -> str:
    """A few questions and answers: before the first preemption, across migrations (their
    streams broke and were resumed elsewhere), after the last one; each with whether it is
    the no-preemption reference's answer token for token."""
    served = [r for r in result.records if r not in result.failed]
    upheavals = _upheavals(cloud)
    first_move = upheavals[0][0] if upheavals else float("inf")
    last_config = result.configs[-1]["t"] if result.configs else 0.0
    picks: list[tuple[str, RequestRecord]] = []

    def fresh(records: list[RequestRecord]) -> list[RequestRecord]:
        """Those asking a question not picked yet first, then the rest, in order."""
        asked = {r.question for _, r in picks}
        return [r for r in records if r.question not in asked] + \
            [r for r in records if r.question in asked]

    before = [r for r in served if r.done < first_move]
    if before:
        picks.append(("before any preemption", before[0]))
    resumed = [r for r in served if r.resumes]
    for _ in range(min(2, len(resumed))):
        record = next(r for r in fresh(resumed) if all(r is not c for _, c in picks))
        when, pipeline = record.interruptions[0] if record.interruptions else (0.0, "?")
        resumes = "; ".join(r + (" token" if r.endswith(" after 1") else " tokens")
                            for r in record.resumes)
        picks.append((f"across a migration: its stream broke at {when:.1f}s on {pipeline}, "
                      f"resumed by {resumes}", record))
    after = [r for r in served if r.sent > max(last_config, upheavals[-1][0] if upheavals
                                               else 0.0)]
    if after:
        picks.append(("after the last migration", fresh(after[::-1])[0]))
    lines = ["\n=== a few answers ==="]
    for label, record in picks:
        reference = result.reference.get(record.request_id)
        same = ("" if reference is None else "; the same as with no preemption"
                if reference == record.tokens else "; NOT the reference's answer")
        lines += [f"Q: {record.question}", f"A: {_clip(record, 300)}",
                  f"   ({record.request_id}, {label}{same})"]
    return "\n".join(lines)
