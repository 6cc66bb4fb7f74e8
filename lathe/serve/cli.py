"""CLI verbs: `lathe serve` (the OpenAI-compatible server and web chat), `lathe chat` (terminal chat)
and `lathe memory` (task memory, see memory_cli).

    lathe serve --run runs/my-run --adapter math=adapters/math --port 8000 --api-key KEY
    lathe chat --run runs/my-run

Cheap to import: fastapi, torch and the engine load inside the handlers.
"""

from __future__ import annotations

import argparse
import os

from lathe.serve import memory_cli


def adapter_option(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got '{text}'")
    return name, folder


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run directory (default: the newest run under runs/)")
    p.add_argument("--adapter", action="append", default=[], type=adapter_option, metavar="NAME=DIR",
                   help="also serve a LoRA adapter folder under NAME (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default cpu)")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    _add_model_options(p)
    p.add_argument("--name", help="model name of the base run (default: the run folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LATHE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LATHE_API_KEY, else none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-pending", type=int, default=256, help="requests queued or running before 429")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000, help="largest request body before 413")
    p.add_argument("--max-batch", type=int, default=64, help="samples decoded together in one batch")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("chat", help="chat with a run in the terminal (streamed replies, slash commands)")
    _add_model_options(p)
    p.add_argument("--use", metavar="NAME", help="start with this adapter")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply")
    p.add_argument("--seed", type=int)
    p.set_defaults(handler=_chat)

    memory_cli.register(sub)


def _serve(args) -> int:
    from lathe.console import info, warn
    from lathe.rundir import RunDir
    from lathe.serve.server import Limits, create_app, listen, load_models, uvicorn_server

    limits = Limits(max_tokens=args.max_tokens, max_pending=args.max_pending,
                    max_request_bytes=args.max_request_bytes, max_batch_rows=args.max_batch,
                    default_max_tokens=min(256, args.max_tokens))
    run = RunDir.resolve(args.run)
    models = load_models(run.path, dict(args.adapter), args.device, args.name)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        warn(f"listening on {args.host} without --api-key: anyone who can reach this port can use the model")
    app = create_app(models, api_key=args.api_key, limits=limits)
    sock = listen(args.host, args.port)  # a taken port is a one-line LatheError, before uvicorn starts
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    info(f"serving {', '.join(models)} at {url}/v1 (web chat: {url}/); Ctrl-C to stop")
    try:
        uvicorn_server(app).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then re-raises it: a normal stop
        pass
    info("server stopped")
    return 0


def _chat(args) -> int:
    from lathe.serve.chat_cli import chat_main

    return chat_main(args)
