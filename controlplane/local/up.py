"""The body of `spotserve up --local` (see `up_cli`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import shutil
import signal
import sys

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec
from spotserve.tokenizer import chat_template

from ..controller.controller import Controller
from ..controller.events import LoadChanged
from ..controller.journal import Journal
from .backend import BackendOptions, LocalBackend, visible_gpus
from .cloud import Script
from .model_choice import local_model
from .router_process import RouterProcess
from .runner import CATALOG, RunOptions, settings_for


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()   # Ctrl-C (or SIGTERM) stops it at any moment, starting too
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    args.out = args.out.resolve()  # workers run elsewhere: every path they get is absolute
    # A previous run's controller state names workers that ended with that run: resuming
    # it would wait on them for ever. Each run starts clean.
    shutil.rmtree(args.out / "controller", ignore_errors=True)
    model_dir = local_model(args.model, args.out,   # stdout's first line says "serving"
                            lambda text: print(text, file=sys.stderr, flush=True))
    model = ModelSpec.from_hf_config(model_dir)
    catalog = Catalog.load(CATALOG)
    catalog.instance(args.instance_type)
    if args.device == "cuda" and visible_gpus() == 0:
        raise SpotserveError("--device cuda: no CUDA GPU is visible here (nvidia-smi -L "
                             "lists none, or CUDA_VISIBLE_DEVICES is empty)")
    token = secrets.token_hex(16)
    router = await RouterProcess.start(model_dir, args.out / "logs", token, args.grpc,
                                       args.http, max_queue=args.max_queue,
                                       max_concurrency=args.max_concurrency)
    backend = LocalBackend(model, catalog, BackendOptions(
        model_dir=model_dir, workdir=args.out / "logs", router_addresses=(router.control_address,),
        token=token, device=args.device))
    options = RunOptions(model_dir=model_dir, workdir=args.out, script=Script((), 0, "none"),
                         min_gpus_per_replica=1, standby=0)
    controller = Controller(settings_for(model, options), backend,
                            Journal(args.out / "controller"))
    tasks = [asyncio.create_task(controller.run())]
    try:
        await controller.submit(LoadChanged(1.0))
        await asyncio.gather(*(backend.add_instance(f"local{i}", args.instance_type)
                               for i in range(args.instances)))
        while not any(p.state == "serving" for p in backend.routed):
            if stop.is_set():
                print("stopped before serving", flush=True)
                return 0
            failed = [e for e in backend.timeline if e["kind"] == "boot-failed"]
            if len(failed) == len(backend.instances):   # every instance: nothing can serve
                raise SpotserveError(f"the workers could not start: {failed[-1]['error']}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
            await _forward(backend, controller)
        tasks.append(asyncio.create_task(_forward_forever(backend, controller)))
        host = args.http.rpartition(":")[0]
        plan = controller.last_plan
        config = plan.config.describe() if plan and plan.config else "-"
        base = f"http://{host}:{router.http_port}/v1"
        name = model_dir.name
        print(f"serving {model_dir} as model {name!r} ({config}) on {base} (OpenAI API) "
              f"and grpc {router.grpc_address}; Ctrl-C stops\n"
              f"try: curl {base}/{_example(name, chat_template(model_dir) is not None)}",
              flush=True)
        await stop.wait()
        return 0
    finally:
        for task in tasks:
            task.cancel()
        await backend.close()
        await router.stop()


def _example(name: str, chat: bool) -> str:
    """The rest of a curl command line that asks the served model something."""
    if chat:
        # greedy: the OpenAI default (temperature 1) makes a small model ramble
        body = (f'{{"model": "{name}", "max_tokens": 32, "temperature": 0, "messages": '
                f'[{{"role": "user", "content": "What is the capital of France?"}}]}}')
        return f"chat/completions -H 'content-type: application/json' -d '{body}'"
    body = f'{{"model": "{name}", "prompt": "hello", "max_tokens": 16}}'
    return f"completions -H 'content-type: application/json' -d '{body}'"


async def _forward(backend: LocalBackend, controller: Controller) -> None:
    while not backend.events.empty():
        await controller.submit(backend.events.get_nowait())


async def _forward_forever(backend: LocalBackend, controller: Controller) -> None:
    while True:
        await controller.submit(await backend.events.get())


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(args))
