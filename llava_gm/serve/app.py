"""The OpenAI-compatible HTTP server: POST /v1/chat/completions (streamed or not), GET /v1/models, GET /health,
and the web page at /. Every error is OpenAI's shape with 400 (bad input), 404 (unknown model or route),
413 (body or image too large) or 503 (queue full)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.core import Sampling, Sequence
from ..errors import LlavaGMError
from .scheduler import Job, QueueFull, Scheduler
from .schema import ApiError, ChatRequest, bad, parse_request
from .sources import ImagePolicy, read_image


@dataclass
class ServerOptions:
    policy: ImagePolicy
    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # requests waiting beyond those; more get 503
    batching: bool = True  # False: one request at a time (the baseline of bench/serve_load.py)
    max_body_bytes: int = 16 * 2**20
    default_max_tokens: int = 256  # when a request names none (and the context has room)
    admit_wait: float = 0.05  # seconds an idle engine waits for requests still being read to join the first (scheduler.py)


def create_app(answerer, options: Optional[ServerOptions] = None) -> FastAPI:
    options = options or ServerOptions(ImagePolicy())
    scheduler = Scheduler(answerer, options.max_batch, options.max_queue, options.batching, options.admit_wait).start()
    model_id = answerer.model_id
    tokenizer = answerer.model.tokenizer
    context = int(getattr(answerer.model.lm.config.get_text_config(), "max_position_embeddings", 0) or 8192)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):  # the engine thread runs from create_app on (clients without lifespan events work too)
        yield
        scheduler.stop()

    app = FastAPI(title="llava-gm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        what = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        body = ApiError(e.status_code, what.get(e.status_code, str(e.detail)), None, "not_found" if e.status_code == 404 else None).body()
        return JSONResponse(body, status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **scheduler.load()}

    def model_card():
        return {"id": model_id, "object": "model", "created": started, "owned_by": "llava-gm"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise ApiError(404, f"model {name!r} not found; this server serves {model_id!r}", "model", "model_not_found")
        return model_card()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = resources.files("llava_gm.serve").joinpath("static/index.html").read_text()
        return html.replace("{{MODEL_ID}}", json.dumps(model_id)[1:-1].replace("<", "\\u003c"))

    @app.post("/v1/relevancy")
    async def relevancy(request: Request):
        """Our extension (the page's "show the relevancy map"): {"image": URL, "question": str, "max_tokens"?} -> {"answer", "png"},
        the image overlaid with each image token's relevance to the answer (llava_gm/analysis/relevancy.py)."""
        try:
            from ..analysis.relevancy import overlay_png, relevancy_map
        except ImportError:
            raise ApiError(404, "relevancy maps are not available in this installation", None, "not_found") from None
        body = await _read_json(request, options.max_body_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("question"), str) or not body["question"].strip():
            raise bad("question must be a non-empty string", "question")
        if not isinstance(body.get("image"), str) or not body["image"]:
            raise bad("image must be an image URL (a data: URL)", "image")
        max_tokens = body.get("max_tokens", 64)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= context:
            raise bad(f"max_tokens must be an integer from 1 to {context}", "max_tokens")
        image, _ = await run_in_threadpool(read_image, body["image"], "image", options.policy)

        def work():
            answer, relevance = relevancy_map(answerer, image, body["question"], max_new_tokens=max_tokens)
            return answer, overlay_png(image, relevance, title=f"{body['question']} -> {answer}")

        try:
            answer, png = await asyncio.wrap_future(scheduler.run_exclusive(work))
        except LlavaGMError as e:
            raise bad(str(e), None) from None
        return {"answer": answer, "png": "data:image/png;base64," + base64.b64encode(png).decode()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        with scheduler.arriving():  # requests read together are admitted together (scheduler.py)
            req = parse_request(await _read_json(request, options.max_body_bytes), max_tokens_cap=context)
            if req.model != model_id:
                raise ApiError(404, f"model {req.model!r} not found; this server serves {model_id!r}", "model", "model_not_found")
            job = await _job(req)
            try:
                scheduler.submit(job)
            except QueueFull:
                raise ApiError(503, f"the server is busy ({options.max_queue} requests waiting); retry shortly", None, "queue_full") from None
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if req.stream:
            return StreamingResponse(_stream(job, req, meta), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, job, req, meta)

    async def _job(req: ChatRequest) -> Job:
        image, key, messages = None, None, []
        for turn in req.turns:
            text = turn.text
            if turn.image is not None:
                image, data = await run_in_threadpool(read_image, turn.image, turn.image_param, options.policy)
                key = hashlib.sha1(data).hexdigest()  # the same picture in two requests shares its prefill when they join together
                text = f"<image>\n{text}"
            messages.append({"role": turn.role, "content": text})
        try:
            prompt = answerer.encoder.encode_prompt(messages)
        except Exception as e:  # the chat template refused the conversation
            raise bad(f"messages: the model's chat template cannot render this conversation ({e})", "messages") from None
        room = context - len(prompt)
        if room < 1 or (req.max_tokens or 1) > room:
            raise bad(f"the prompt is {len(prompt)} tokens and asks for {req.max_tokens or 1} more, over the model's context of {context}; "
                      "shorten the conversation or lower max_tokens", "messages", "context_length_exceeded")
        max_tokens = req.max_tokens or min(options.default_max_tokens, room)
        seq = Sequence(prompt, image_key=key, sampling=Sampling(max_tokens, req.temperature, req.top_p, req.seed, req.stop))
        return Job(seq, image, asyncio.get_running_loop())

    def usage(seq: Sequence) -> dict:
        return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.tokens), "total_tokens": len(seq.prompt) + len(seq.tokens)}

    def experts(seq: Sequence) -> dict:
        """Per answer token fed back to the model: its text and, per sparse layer, the experts it used."""
        return {"kind": answerer.model.cfg.sparse.kind, "layers": answerer.model.sparse_layers,
                "tokens": [{"text": tokenizer.decode([t]), "experts": {str(k): v for k, v in e.items()}} for t, e in zip(seq.tokens, seq.experts)]}

    async def _complete(request: Request, job: Job, req: ChatRequest, meta: dict):
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        scheduler.cancel(job)
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    raise value
                if kind == "done":
                    break
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise
        seq = value
        body = {**meta, "object": "chat.completion", "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": seq.text}, "logprobs": None, "finish_reason": seq.finish_reason}],
                "usage": usage(seq)}
        if req.experts and seq.experts:
            body["experts"] = experts(seq)
        return body

    async def _stream(job: Job, req: ChatRequest, meta: dict):
        def chunk(delta: dict, finish: Optional[str] = None, **extra) -> str:
            body = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            if req.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        done = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    break
                else:
                    extra = {"experts": experts(value)} if req.experts and value.experts else {}
                    yield chunk({}, value.finish_reason, **extra)
                    if req.include_usage:
                        yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'system_fingerprint': None, 'choices': [], 'usage': usage(value)})}\n\n"
                    break
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away mid-answer: free its row now
                scheduler.cancel(job)

    return app


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes, over this server's limit of {limit}", None, "body_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes", None, "body_too_large")
    if not data:
        raise bad("the request body is empty: send a JSON object with model and messages")
    try:
        return json.loads(data)
    except RecursionError:
        raise bad("the request body nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
