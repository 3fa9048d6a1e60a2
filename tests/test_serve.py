"""`llava-gm serve`: OpenAI's own client against the live server, streamed and not, gives `llava-gm ask`'s answer;
errors come in OpenAI's shape and status; concurrent requests batch; a client that leaves frees its row."""

import asyncio
import os
import json
import time

import httpx
import pytest
from serve_helpers import data_url, live_server

import tiny
from llava_gm.cli import main
from llava_gm.infer import Answerer
from llava_gm.serve.app import ServerOptions, create_app
from llava_gm.serve.sources import ImagePolicy

openai = pytest.importorskip("openai")
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module", autouse=True)
def _fp32():
    """Answers are compared exactly across batch compositions (alone vs together, server vs `ask`): on a bf16 host the
    rounding of a different batch shape flips near-ties of an untrained model's logits, so these tests compute in fp32."""
    before = os.environ.get("LLAVA_GM_PRECISION")
    os.environ["LLAVA_GM_PRECISION"] = "fp32"
    yield
    if before is None:
        os.environ.pop("LLAVA_GM_PRECISION", None)
    else:
        os.environ["LLAVA_GM_PRECISION"] = before


@pytest.fixture(scope="module")
def answerer(random_checkpoint):
    return Answerer.from_checkpoint(random_checkpoint)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    tiny.draw_shape("blue", "triangle").save(path)
    return path


@pytest.fixture(scope="module")
def server(answerer, image_file):
    app = create_app(answerer, ServerOptions(ImagePolicy(allow_files=image_file.parent), max_batch=8))
    with live_server(app) as url:
        yield url, app


def _ask(checkpoint, image, question, n, capsys):
    assert main(["ask", "--checkpoint", checkpoint, "--image", str(image), "--question", question, "--max-new-tokens", str(n)]) == 0
    return capsys.readouterr().out[:-1]


def test_openai_client_gets_the_answer_of_llava_gm_ask(server, answerer, random_checkpoint, image_file, capsys):
    from PIL import Image

    url, _ = server
    want = _ask(random_checkpoint, image_file, QUESTION, 12, capsys)
    assert len(want) > 3
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [answerer.model_id]
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                              {"type": "image_url", "image_url": {"url": data_url(Image.open(image_file))}}]}]
    r = client.chat.completions.create(model=answerer.model_id, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model=answerer.model_id, messages=messages, max_completion_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12  # the usage chunk comes last
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 2  # it streamed in pieces
    # the same image as a file under --allow-files, and a bare string URL
    for part in ({"type": "image_url", "image_url": {"url": str(image_file)}}, {"type": "image_url", "image_url": str(image_file)}):
        r = client.chat.completions.create(model=answerer.model_id, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}, part]}])
        assert r.choices[0].message.content == want


def test_history_system_message_stop_and_seed(server, answerer):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "describe the image briefly"},
                {"role": "assistant", "content": "a red circle"}, {"role": "user", "content": "what is the shape?"}]
    full = client.chat.completions.create(model=answerer.model_id, messages=messages, max_tokens=16, temperature=0).choices[0].message.content
    prompt = answerer.encoder.encode_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
    tokens = answerer.engine.generate([prompt], max_new_tokens=16)[0]
    assert full == answerer.model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = client.chat.completions.create(model=answerer.model_id, messages=messages, max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert cut.choices[0].message.content == full[: full.find(stop)].rstrip() and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=answerer.model_id, messages=messages, max_tokens=16, temperature=1.0, top_p=0.9,
                                              seed=seed).choices[0].message.content for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def _post(app, body, **kw):
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/v1/chat/completions", content=body if isinstance(body, bytes) else json.dumps(body), **kw)

    return asyncio.run(run())


def _error(r, status, param=...):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not ...:
        assert err["param"] == param
    return err


def test_errors_are_openai_shaped_with_the_right_status(server, answerer):
    _, app = server
    ok = {"model": answerer.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(app, ok).status_code == 200
    _error(_post(app, b"{not json"), 400)
    _error(_post(app, {**ok, "model": "gpt-4"}), 404, "model")
    _error(_post(app, {**ok, "temperature": "hot"}), 400, "temperature")
    _error(_post(app, {**ok, "max_tokens": 10**6}), 400, "max_tokens")
    _error(_post(app, {**ok, "messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role")
    _error(_post(app, {**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    img = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    err = _error(_post(app, {**ok, "messages": [{"role": "user", "content": [img]}]}), 400, "messages[0].content[0].image_url.url")
    assert "fetches no URLs" in err["message"]
    img = {"type": "image_url", "image_url": {"url": "/etc/passwd"}}
    assert "outside the folder" in _error(_post(app, {**ok, "messages": [{"role": "user", "content": [img]}]}), 400)["message"]
    _error(_post(app, b"x" * (17 * 2**20)), 413)
    assert asyncio.run(_get(app, "/v1/models/nope")).status_code == 404
    assert asyncio.run(_get(app, "/v2/whatever")).json()["error"]["code"] == "not_found"


async def _get(app, path):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        return await c.get(path)


def test_full_queue_is_503_and_an_engine_failure_mid_stream_is_a_data_event(answerer):
    app = create_app(answerer, ServerOptions(ImagePolicy(), max_queue=0))
    ok = {"model": answerer.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert _error(_post(app, ok), 503)["code"] == "queue_full"
    app.state.scheduler.stop()
    app = create_app(answerer, ServerOptions(ImagePolicy()))
    engine = app.state.scheduler.engine
    real = engine.step
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(batch)

    engine.step = failing
    try:
        r = _post(app, {**ok, "stream": True, "max_tokens": 8})
    finally:
        engine.step = real
        app.state.scheduler.stop()
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "out of memory" in json.loads(events[-2])["error"]["message"]


def test_concurrent_requests_batch_and_answer_as_alone(server, answerer):
    url, app = server
    scheduler = app.state.scheduler
    sizes = []
    real = scheduler.engine.step
    scheduler.engine.step = lambda batch: sizes.append(len(batch)) or real(batch)
    questions = ["what is the shape?", "describe the image briefly", "is there a red circle?", "yes", "the quick brown fox"]

    def body(q, n):
        return {"model": answerer.model_id, "messages": [{"role": "user", "content": q}], "max_tokens": n, "temperature": 0}

    try:
        alone = [httpx.post(f"{url}/v1/chat/completions", json=body(q, 6 + i), timeout=60).json() for i, q in enumerate(questions)]
        sizes.clear()

        async def together():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*[c.post("/v1/chat/completions", json=body(q, 6 + i)) for i, q in enumerate(questions)])

        rs = asyncio.run(together())
    finally:
        scheduler.engine.step = real
    assert [r.json()["choices"][0]["message"]["content"] for r in rs] == [a["choices"][0]["message"]["content"] for a in alone]
    assert max(sizes) > 1  # they shared decode steps


def test_requests_read_together_share_one_tower_call_and_one_prefill_and_a_bad_one_fails_alone(answerer):
    """While an idle engine has a request and others are still being read (`arriving`), it waits for them: all are
    encoded in one vision tower call and prefilled in one batch, and each gets the answer it gets alone. A request
    that arrives alone waits for nothing; a request the engine refuses fails alone, the others of its group go on."""
    from llava_gm.engine.core import Sampling, Sequence
    from llava_gm.serve.scheduler import Job, Scheduler

    questions = ["what color is the shape?", "what is the shape?", "is it red?"]
    images = [tiny.draw_shape(c, s) for c, s in [("red", "circle"), ("blue", "triangle"), ("green", "rectangle")]]
    alone = [answerer.answer([{"prompt": q, "image": im}], max_new_tokens=5, progress=False)[0] for q, im in zip(questions, images)]
    towers, prefills = [], []
    real_features, real_prefill = answerer.image_features, answerer.engine.prefill
    answerer.image_features = lambda ims, **kw: towers.append(len(ims)) or real_features(ims, **kw)
    answerer.engine.prefill = lambda seqs: prefills.append(len(seqs)) or real_prefill(seqs)
    scheduler = Scheduler(answerer, max_batch=8, admit_wait=30.0).start()

    def job(q, image, loop):
        prompt = answerer.encoder.encode_prompt([{"role": "user", "content": f"<image>\n{q}" if image is not None else q}])
        return Job(Sequence(prompt, image_key=id(image) if image is not None else None, sampling=Sampling(max_tokens=5)), image, loop)

    async def result(j):
        kind, value = await asyncio.wait_for(_last_event(j), 60)
        return value.text if kind == "done" else value

    async def run():
        loop = asyncio.get_running_loop()
        readers = [scheduler.arriving() for _ in questions]
        for r in readers:  # three handlers start reading at once ...
            r.__enter__()
        jobs = [job(q, im, loop) for q, im in zip(questions, images)]
        for r, j in zip(readers, jobs):  # ... and finish one after another
            await asyncio.sleep(0.2)
            scheduler.submit(j)
            r.__exit__(None, None, None)
        grouped = [await result(j) for j in jobs]
        scheduler.admit_wait = 0.5  # three rows just finished: a lone request waits at most this long for two more
        await asyncio.sleep(0.6)
        t0 = time.perf_counter()
        lone = job(questions[0], images[0], loop)
        scheduler.submit(lone)
        lone_text, lone_s = await result(lone), time.perf_counter() - t0
        # a prompt with an <image> slot but no image: the engine refuses it; it is admitted with two good ones
        bad = job(questions[1], None, loop)
        bad.seq.prompt = jobs[1].seq.prompt
        mixed = [job(questions[0], images[0], loop), bad, job(questions[2], images[2], loop)]
        readers = [scheduler.arriving() for _ in mixed]
        for r in readers:
            r.__enter__()
        for r, j in zip(readers, mixed):
            scheduler.submit(j)
            r.__exit__(None, None, None)
        return grouped, lone_text, lone_s, [await result(j) for j in mixed]

    try:
        grouped, lone_text, lone_s, mixed = asyncio.run(run())
    finally:
        scheduler.stop()
        answerer.image_features, answerer.engine.prefill = real_features, real_prefill
    assert grouped == alone
    assert towers[0] == 3 and prefills[0] == 3  # one tower call, one prefill for the three
    assert lone_text == alone[0] and lone_s < 30  # alone: admitted at once, not after the 30 s admission limit
    assert mixed[0] == alone[0] and mixed[2] == alone[2]
    assert "generation failed" in mixed[1].message and mixed[1].status == 500


async def _last_event(job):
    while True:
        kind, value = await job.events.get()
        if kind in ("done", "error"):
            return kind, value


def test_a_client_that_leaves_frees_its_row(server, answerer):
    url, app = server
    scheduler = app.state.scheduler
    seen = []
    real = scheduler.submit
    scheduler.submit = lambda job: seen.append(job) or real(job)
    body = {"model": answerer.model_id, "messages": [{"role": "user", "content": "describe the image briefly"}], "max_tokens": 480,
            "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    finally:
        scheduler.submit = real
    deadline = time.time() + 10
    while (seen[0].seq.finish_reason is None or scheduler.load()["running"]) and time.time() < deadline:
        time.sleep(0.02)
    assert seen[0].seq.finish_reason == "cancelled" and len(seen[0].seq.tokens) < 480
    assert scheduler.load()["running"] == 0


def test_a_request_cancelled_before_it_runs_ends_cancelled():
    # a grouped admission may hold a request in the queue for ~50 ms: a client leaving then ends it there
    import threading
    from collections import deque

    from llava_gm.engine.core import Sequence
    from llava_gm.serve.scheduler import Job, Scheduler

    scheduler = Scheduler.__new__(Scheduler)  # the queue logic alone, no engine thread
    scheduler.cond, scheduler.pending = threading.Condition(), deque()
    job = Job(Sequence(prompt=[1, 2]), None, asyncio.new_event_loop())
    scheduler.pending.append(job)
    scheduler.cancel(job)
    assert not scheduler.pending and job.seq.cancelled and job.seq.finish_reason == "cancelled"


def test_chat_command_streams_and_keeps_the_conversation(random_checkpoint, image_file, monkeypatch, capsys):
    import io

    stdin = io.StringIO(f"what color is the shape?\n/reset\n/image {image_file}\n/image nope.png\nwhat is it?\nand now?\n/bogus\n/quit\n")
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", "--checkpoint", random_checkpoint, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "(new conversation)" in out and f"(new conversation about {image_file})" in out
    assert "error: nope.png" in out and "unknown command /bogus" in out
    assert out.count("> ") == 8  # a prompt per line read
    # the two questions about the image: the second one saw the first one's answer
    from llava_gm.serve.chat import Chat
    from llava_gm.engine.core import Sampling

    chat = Chat(Answerer.from_checkpoint(random_checkpoint), Sampling(max_tokens=5), out=io.StringIO())
    chat.set_image(str(image_file))
    first = chat.say("what is it?")
    assert chat.messages[0]["content"].startswith("<image>") and chat.messages[1] == {"role": "assistant", "content": first}
    chat.say("and now?")
    assert len(chat.messages) == 4 and first in out
