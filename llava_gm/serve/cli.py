"""`llava-gm serve` and `llava-gm chat`."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import LlavaGMError


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible chat completions server and a web page, on loopback by default")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-files", metavar="DIR", help="let requests name image files under this folder (default: none)")
    p.add_argument("--allow-urls", action="store_true", help="let requests name http(s) image URLs, fetched with size and time caps")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 503")
    p.add_argument("--no-batching", action="store_true", help="one request at a time (a baseline)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode steps (~1 min per new batch shape)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a model in the terminal (/image PATH, /reset, /quit)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", help="image file the conversation is about")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_chat)


def cmd_serve(a) -> None:
    try:
        import uvicorn

        from .app import ServerOptions, create_app
    except ImportError as e:
        raise LlavaGMError(f"serving needs the serve extra ({e.name} is missing): pip install 'llava-gm[serve]'") from None
    from ..infer import Answerer
    from .sources import ImagePolicy

    if a.allow_files and not Path(a.allow_files).is_dir():
        raise LlavaGMError(f"--allow-files {a.allow_files}: no such folder")
    if a.max_batch < 1 or a.max_queue < 0:
        raise LlavaGMError("--max-batch must be at least 1 and --max-queue at least 0")
    answerer = Answerer.from_checkpoint(a.checkpoint, compile=a.compile)
    policy = ImagePolicy(allow_files=Path(a.allow_files) if a.allow_files else None, allow_urls=a.allow_urls)
    app = create_app(answerer, ServerOptions(policy, max_batch=a.max_batch, max_queue=a.max_queue, batching=not a.no_batching))
    print(f"serving {answerer.model_id} at http://{a.host}:{a.port}/ (OpenAI API under /v1)", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


def cmd_chat(a) -> None:
    from .chat import Chat

    Chat.from_checkpoint(a.checkpoint, max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed).run(a.image)
