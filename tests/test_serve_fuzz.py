"""Bad input to the server, generated: >= 500 malformed requests (broken JSON, wrong types, unknown roles, empty
messages, bytes that are no image, truncated PNGs, decompression bombs, too many tokens, oversized bodies) each
get a 4xx JSON error in OpenAI's shape, none a 5xx or a hang; afterwards a valid request still gets the right
answer and the server holds no more memory than before."""

import base64
import io
import json
import signal
import struct
import zlib

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import data_url, live_server

import tiny
from llava_gm.infer import Answerer
from llava_gm.serve.app import ServerOptions, create_app
from llava_gm.serve.sources import ImagePolicy

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

MAX_BODY = 64 * 1024  # small caps, so that oversized bodies and images are cheap to make
MAX_IMAGE = 16 * 1024
MODEL = "random-ckpt"


def _png(w=8, h=8) -> bytes:
    buf = io.BytesIO()
    tiny.draw_shape("green", "circle").resize((w, h)).save(buf, "PNG")
    return buf.getvalue()


def _bomb(w: int, h: int) -> bytes:
    """A small PNG whose header declares w x h pixels (a decompression bomb's shape), valid CRCs."""
    raw = zlib.compress(b"\x00" * 64)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _url(data: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


GOOD_PNG = _png()
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.text(max_size=20),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))

bad_images = st.one_of(
    st.binary(min_size=1, max_size=200).map(_url),  # bytes that are no image
    st.integers(8, len(GOOD_PNG) - 1).map(lambda n: _url(GOOD_PNG[:n])),  # truncated PNGs
    st.tuples(st.integers(5000, 10**5), st.integers(5000, 10**5)).map(lambda wh: _url(_bomb(*wh))),  # bombs
    st.just(_url(b"\x00" * (MAX_IMAGE + 10))),  # over the image cap
    st.text(alphabet="!@#$%^&*", min_size=1, max_size=30).map(lambda s: "data:image/png;base64," + s),  # not base64
    st.sampled_from(["data:image/png,abc", "data:,", "ftp://x/y.png", "http://127.0.0.1:1/a.png", "https://example.com/a.png",
                     "/etc/passwd", "file:///etc/hostname", "../secret.png", "javascript:alert(1)"]),
)


def _messages_with(part):
    return [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, part]}]


bad_messages = st.one_of(
    junk.filter(lambda x: not isinstance(x, list) or not x),
    st.just([]),
    st.lists(junk, min_size=1, max_size=3),  # messages that are no objects
    st.text(max_size=10).filter(lambda r: r not in ("system", "developer", "user", "assistant")).map(
        lambda r: [{"role": r, "content": "hi"}]),  # unknown roles
    st.sampled_from(["", "   ", "\n"]).map(lambda c: [{"role": "user", "content": c}]),  # empty messages
    st.just([{"role": "user"}]),
    junk.filter(lambda c: not isinstance(c, (str, list))).map(lambda c: [{"role": "user", "content": c}]),
    st.lists(junk, min_size=1, max_size=2).map(lambda parts: [{"role": "user", "content": parts}]),
    st.just([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),  # ends with the model
    st.just([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]),
    st.just([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}, {"role": "user", "content": "x"}]),
    st.just([{"role": "user", "content": "see <image> here"}]),
    st.integers(700, 3000).map(lambda n: [{"role": "user", "content": "red " * n}]),  # too many tokens
    bad_images.map(lambda u: _messages_with({"type": "image_url", "image_url": {"url": u}})),
    st.just(_messages_with({"type": "image_url", "image_url": {"url": _url(GOOD_PNG)}}) + [
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "image_url", "image_url": _url(GOOD_PNG)}]}]),
    st.sampled_from(["video", "audio", None, 3]).map(lambda t: _messages_with({"type": t})),
)

bad_fields = st.one_of(
    st.tuples(st.just("max_tokens"), st.one_of(st.integers(max_value=0), st.integers(min_value=10**4), st.floats(), st.text(max_size=3),
                                                st.booleans())),
    st.tuples(st.just("max_completion_tokens"), st.one_of(st.integers(max_value=0), st.text(max_size=3))),
    st.tuples(st.just("temperature"), st.one_of(st.floats(max_value=-0.01), st.floats(min_value=2.01), st.text(max_size=3), st.booleans())),
    st.tuples(st.just("top_p"), st.one_of(st.floats(max_value=0), st.floats(min_value=1.01), st.text(max_size=3))),
    st.tuples(st.just("stop"), st.one_of(st.just(""), st.lists(st.text(min_size=1, max_size=3), min_size=5, max_size=8),
                                         st.just([]), st.lists(st.integers(), min_size=1, max_size=2), st.just("x" * 300))),
    st.tuples(st.just("seed"), st.one_of(st.floats(), st.text(max_size=3), st.integers(min_value=2**64), st.booleans())),
    st.tuples(st.just("stream"), st.one_of(st.integers(), st.text(max_size=3))),
    st.tuples(st.just("stream_options"), st.one_of(st.integers(), st.just({"include_usage": "yes"}), st.just({"include_usage": True}))),
    st.tuples(st.just("n"), st.one_of(st.integers(2, 9), st.just(0), st.just(True), st.text(max_size=2))),
    st.tuples(st.just("model"), st.one_of(st.just(None), st.integers(), st.text(max_size=8).filter(lambda m: m != MODEL))),
    st.tuples(st.just("messages"), bad_messages),
)


@st.composite
def malformed(draw):
    """(body bytes, why it is bad)."""
    how = draw(st.sampled_from(["field", "field", "field", "json", "top", "big"]))
    if how == "json":
        if draw(st.booleans()):
            text = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            return text[: draw(st.integers(0, len(text) - 1))].encode(), "truncated JSON"
        return draw(st.binary(max_size=50).filter(_not_json)), "broken JSON"
    if how == "top":
        return json.dumps(draw(junk.filter(lambda x: not isinstance(x, dict)))).encode(), "not an object"
    if how == "big":
        return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}).encode(), "oversized"
    name, value = draw(bad_fields)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, name: value}
    if name == "stream_options":
        body.pop("stream", None)  # stream_options needs stream: true
    return json.dumps(body).encode(), name


def _not_json(b: bytes) -> bool:
    try:
        return not isinstance(json.loads(b), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return True


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.fixture(scope="module")
def app(random_checkpoint):
    answerer = Answerer.from_checkpoint(random_checkpoint)
    assert answerer.model_id == MODEL
    app = create_app(answerer, ServerOptions(ImagePolicy(max_bytes=MAX_IMAGE), max_body_bytes=MAX_BODY))
    yield app
    app.state.scheduler.stop()


def _check_error(r):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] and "param" in err and "code" in err
    assert "Traceback" not in err["message"]


def test_malformed_requests_get_4xx_errors_and_leave_nothing_behind(app):
    valid = {"model": MODEL, "messages": _messages_with({"type": "image_url", "image_url": {"url": data_url()}}), "max_tokens": 6,
             "temperature": 0}
    statuses = []
    with TestClient(app, raise_server_exceptions=False) as client:
        want = client.post("/v1/chat/completions", json=valid).json()["choices"][0]["message"]["content"]
        for body in (b"{", b"[]", b"null"):  # warm up the error paths before measuring memory
            client.post("/v1/chat/completions", content=body)
        before = _rss_mb()

        def on_alarm(*_):
            raise TimeoutError("a request hung")

        old = signal.signal(signal.SIGALRM, on_alarm)

        @settings(max_examples=520, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
        @given(malformed())
        def one(case):
            body, why = case
            signal.alarm(10)
            try:
                r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            finally:
                signal.alarm(0)
            _check_error(r)
            statuses.append(r.status_code)

        try:
            one()
        finally:
            signal.signal(signal.SIGALRM, old)
        after = _rss_mb()
        again = client.post("/v1/chat/completions", json=valid).json()["choices"][0]["message"]["content"]
    assert len(statuses) >= 500
    assert {400, 404, 413} <= set(statuses)
    assert again == want and len(want) > 3
    assert app.state.scheduler.load()["running"] == 0 and app.state.scheduler.load()["queued"] == 0
    assert after - before < 40, f"memory grew by {after - before:.0f} MB over {len(statuses)} bad requests"


def test_malformed_requests_against_the_live_server(app):
    bodies = [b"{", b"", b'{"model": 1}', json.dumps({"model": MODEL, "messages": [{"role": "x", "content": "y"}]}).encode(),
              json.dumps({"model": MODEL, "messages": _messages_with({"type": "image_url", "image_url": {"url": _url(_bomb(90000, 90000))}})}).encode(),
              json.dumps({"model": MODEL, "messages": _messages_with({"type": "image_url", "image_url": {"url": _url(GOOD_PNG[:40])}})}).encode(),
              b"x" * (MAX_BODY + 100)]
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=20) as c:
            for body in bodies:
                _check_error(c.post("/v1/chat/completions", content=body))
            r = c.post("/v1/chat/completions", content=b"[" * 100000 + b"]" * 100000)  # nesting past the parser's recursion
            assert r.status_code in (400, 413)
            assert c.get("/health").json()["status"] == "ok"
