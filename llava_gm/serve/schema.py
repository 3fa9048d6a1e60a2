"""The chat completions request, checked field by field into a `ChatRequest`; anything wrong is one `ApiError`
naming the field (OpenAI's `param`) and what to do.

Accepted, as OpenAI's API takes them: `messages` (system / developer, user, assistant; content a string or a
list of parts: {"type": "text", "text"}, {"type": "image_url", "image_url": {"url"}} or a bare string URL),
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `stop` (a string or up to 4), `seed`, `stream`,
`stream_options.include_usage`, `n` (1 only). Fields OpenAI's clients may send that change nothing here
(`user`, `logprobs: false`, ...) are ignored. Our one extension: `"experts": true` returns, for MoE / EVF
models, which experts each answer token used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

MAX_STOP = 4
MAX_STOP_CHARS = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"), "param": self.param,
                          "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class Turn:
    role: str  # system | user | assistant
    text: str
    image: Optional[str] = None  # the image's URL (data:, file path, http(s)) as given
    image_param: Optional[str] = None  # where in the request it was, for errors


@dataclass
class ChatRequest:
    model: str
    turns: list[Turn]
    max_tokens: Optional[int] = None
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    experts: bool = False
    extra: dict = field(default_factory=dict)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _type_name(x) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(x), "a number")


def _content(content: Any, where: str, role: str) -> tuple[str, Optional[str], Optional[str]]:
    """(text, image URL or None, where the image is) of one message's content."""
    if isinstance(content, str):
        return content, None, None
    if content is None and role == "assistant":
        return "", None, None
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or an array of content parts, not {_type_name(content)}", where, "invalid_type")
    texts, image, image_param = [], None, None
    for i, part in enumerate(content):
        here = f"{where}[{i}]"
        if not isinstance(part, dict):
            raise bad(f"{here} must be an object like {{\"type\": \"text\", \"text\": ...}}, not {_type_name(part)}", here, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{here}.text must be a string", f"{here}.text", "invalid_type")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{here}: only user messages can carry images", here)
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
                here = f"{here}.image_url.url"
            else:
                here = f"{here}.image_url"
            if not isinstance(url, str) or not url:
                raise bad(f"{here} must be a non-empty string (a data: URL, or a file path or http(s) URL where the server allows them)",
                          here, "invalid_type")
            if image is not None:
                raise bad(f"{here}: one image per message; this model reads one image per conversation", here)
            image, image_param = url, here
        else:
            raise bad(f"{here}.type must be 'text' or 'image_url', not {kind!r}", f"{here}.type")
    return "\n".join(texts), image, image_param


def parse_messages(messages: Any) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty array of {role, content} objects", "messages",
                  "invalid_type" if not isinstance(messages, list) else "invalid_value")
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with a role and a content, not {_type_name(m)}", where, "invalid_type")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise bad(f"{where}.role must be one of system, developer, user, assistant, not {m.get('role')!r}", f"{where}.role")
        if "content" not in m:
            raise bad(f"{where}.content is missing", f"{where}.content", "missing_required_parameter")
        text, image, image_param = _content(m["content"], f"{where}.content", role)
        if "<image>" in text:
            raise bad(f"{where}.content: the text may not contain '<image>'; send the image as an image_url part", f"{where}.content")
        if not text.strip() and image is None:
            raise bad(f"{where}.content is empty: give text or an image", f"{where}.content")
        if role == "system" and any(t.role != "system" for t in turns):
            raise bad(f"{where}: system messages go before the conversation", f"{where}.role")
        if turns and turns[-1].role == role:  # consecutive messages of one role read as one
            prev = turns[-1]
            if image is not None and prev.image is not None:
                raise bad(f"{where}: one image per conversation (this model reads one)", f"{where}.content")
            turns[-1] = Turn(role, "\n\n".join(t for t in (prev.text, text) if t.strip()), prev.image or image,
                             prev.image_param or image_param)
        else:
            turns.append(Turn(role, text, image, image_param))
    convo = [t for t in turns if t.role != "system"]
    if not convo or convo[0].role != "user":
        raise bad("the conversation must start with a user message (after any system message)", "messages")
    if convo[-1].role != "user":
        raise bad("the last message must be a user message: the model answers it", "messages")
    if sum(t.image is not None for t in turns) > 1:
        raise bad("one image per conversation: this model reads one image", "messages")
    return turns


def parse_request(body: Any, max_tokens_cap: int) -> ChatRequest:
    """The checked request; `max_tokens_cap`: the most new tokens a request may ask for."""
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, not {_type_name(body)}", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must be a string: the id GET /v1/models lists", "model",
                  "missing_required_parameter" if model is None else "invalid_type")
    req = ChatRequest(model=model, turns=parse_messages(body.get("messages")))
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= max_tokens_cap:
            raise bad(f"{name} must be an integer from 1 to {max_tokens_cap}, not {value!r}", name)
        req.max_tokens = req.max_tokens or value
    checks = [("temperature", 0.0, 2.0, "a number from 0 to 2"), ("top_p", 0.0, 1.0, "a number above 0, at most 1")]
    for name, lo, hi, what in checks:
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not lo <= value <= hi or (name == "top_p" and value == 0):
            raise bad(f"{name} must be {what}, not {value!r}", name)
        setattr(req, name, float(value))
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
            raise bad(f"stop must be a non-empty string or an array of 1 to {MAX_STOP} of them (at most {MAX_STOP_CHARS} characters each)", "stop")
        req.stop = tuple(stops)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -(2**63) <= seed < 2**64:
            raise bad(f"seed must be an integer, not {seed!r}", "seed")
        req.seed = seed % 2**63  # torch's generators take a 63-bit seed
    for name in ("stream", "experts"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise bad(f"{name} must be true or false, not {value!r}", name, "invalid_type")
        setattr(req, name, bool(value))
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
        if not req.stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        req.include_usage = bool(options.get("include_usage", False))
    n = body.get("n")
    if n is not None and not (_is_int(n) and n == 1):
        raise bad(f"n must be 1 (one answer per request), not {n!r}", "n")
    return req
