"""Load on `llava-gm serve`: 1, 4, 8 and 16 concurrent streaming clients on loopback, continuous batching on and
off (off = one request at a time: the baseline), in one run. Prints requests per second, p50 / p99 latency and
time to first token per setting, the errors, and the throughput ratio batching-on / one-at-a-time.

Each client sends `--requests` chat completions one after another (an image as a data URL and a question,
greedy, `--max-tokens` new tokens). Every request shows a different image (a coloured shape with a marker pixel
of its own) and one of three questions, so nothing is shared between requests (no tower call or prefill saved by
equal images); `--same-image` sends the one image and question of the first version of this bench. Each server runs as its own process (`python -m llava_gm serve`); both are up at once and the two settings are
measured alternately at each client count, so that a noisy host's drift hits both alike.

    .venv/bin/python bench/serve_load.py                      # a tiny random model (built in a temp folder)
    .venv/bin/python bench/serve_load.py --checkpoint runs/demo/instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def tiny_checkpoint(folder: Path) -> str:
    """An untrained tiny model (tests/tiny.py's backbones): answers always run to max_tokens, so every request costs the same."""
    import tiny
    from llava_gm.config import LanguageConfig, ModelConfig, VisionConfig
    from llava_gm.model.build import build_model, save_checkpoint

    cfg = ModelConfig(vision=VisionConfig(name=str(tiny.make_vision(folder / "vision"))),
                      language=LanguageConfig(name=str(tiny.make_lm(folder / "lm")), max_length=512))
    model = build_model(cfg)
    model.trained_keys = {n for n, _ in model.named_parameters() if not n.startswith("vision_tower.")}
    return str(save_checkpoint(model, folder / "tiny-random"))


def start_server(checkpoint: str, port: int, batching: bool, max_batch: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "llava_gm", "serve", "--checkpoint", checkpoint, "--port", str(port), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd + ([] if batching else ["--no-batching"]), cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # a loaded machine can take minutes to import torch and load the model
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


async def one_request(client, body) -> tuple[float, float, bool]:
    """(latency, time to first token, ok) of one streamed completion."""
    t0 = time.perf_counter()
    first, ok = None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return time.perf_counter() - t0, float("nan"), False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                return time.perf_counter() - t0, float("nan"), False
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if event["choices"] and event["choices"][0]["finish_reason"]:
                ok = True
    return time.perf_counter() - t0, first if first is not None else float("nan"), ok


QUESTIONS = ("what color is the shape?", "what shape is in the image?", "is the shape red?")


def make_bodies(n: int, max_tokens: int, same_image: bool) -> list[dict]:
    """n chat completion bodies: each a different image (shape, colour, a marker pixel) and one of QUESTIONS."""
    import tiny
    from serve_helpers import data_url

    bodies = []
    for i in range(n):
        if same_image:
            image, question = None, QUESTIONS[0]
        else:
            colors = list(tiny.COLORS)
            image = tiny.draw_shape(colors[i % len(colors)], tiny.SHAPES[(i // len(colors)) % len(tiny.SHAPES)])
            image.putpixel((i % 32, (i // 32) % 32), (i * 37 % 256, i * 91 % 256, i * 13 % 256))
            question = QUESTIONS[i % len(QUESTIONS)]
        bodies.append({"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                                 {"type": "image_url", "image_url": {"url": data_url(image)}}]}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True})
    return bodies


async def load(url: str, model: str, clients: int, requests: int, bodies: list[dict]) -> dict:
    """Request k of client c sends bodies[(c * requests + k) % len(bodies)]."""
    import httpx

    results = []
    bodies = [dict(b, model=model) for b in bodies]

    async def client_loop(client, c):
        for k in range(requests):
            results.append(await one_request(client, bodies[(c * requests + k) % len(bodies)]))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[client_loop(client, c) for c in range(clients)])
        wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results if r[1] == r[1])
    q = lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": sum(not r[2] for r in results), "req_per_s": len(results) / wall,
            "p50_s": q(lat, 0.5), "p99_s": q(lat, 0.99), "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="default: a tiny random model built in a temp folder")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--same-image", action="store_true", help="every request the same image and question (shared prefills)")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    clients = [int(c) for c in a.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = a.checkpoint or tiny_checkpoint(Path(tmp))
        body = make_bodies(max(clients) * a.requests, a.max_tokens, a.same_image)
        load_before = os.getloadavg()
        table = {}
        # both servers up at once, the two settings measured alternately at each client count: a shared, noisy
        # host drifts between minutes, and the ratio should compare like with like
        servers = {batching: start_server(checkpoint, a.port + batching, batching, max_batch=max(clients)) for batching in (False, True)}
        try:
            import httpx

            urls = {b: f"http://127.0.0.1:{a.port + b}" for b in servers}
            model = httpx.get(f"{urls[True]}/v1/models").json()["data"][0]["id"]
            for b in servers:
                asyncio.run(load(urls[b], model, 1, 2, body[-2:]))  # warm-up
            for c in clients:
                for b in (False, True):
                    table[(b, c)] = asyncio.run(load(urls[b], model, c, a.requests, body))
        finally:
            for proc in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(f"# bench/serve_load.py {' '.join(sys.argv[1:])}  ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
          f"model: {a.checkpoint or 'tiny random'}, at most {a.max_tokens} new tokens per answer, "
          f"{'one image for all' if a.same_image else 'a different image per request'})")
    print(f"# host load average (1, 5, 15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'batching':>9} {'clients':>7} {'reqs':>5} {'errors':>6} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'ttft p50':>9} {'ttft p99':>9}")
    for (batching, c), r in sorted(table.items()):
        print(f"{'on' if batching else 'off':>9} {c:>7} {r['requests']:>5} {r['errors']:>6} {r['req_per_s']:>7.2f} {r['p50_s']:>7.3f} "
              f"{r['p99_s']:>7.3f} {r['ttft_p50_s']:>9.3f} {r['ttft_p99_s']:>9.3f}")
    for c in clients:
        on, off = table[(True, c)], table[(False, c)]
        print(f"{c} clients: batching on / one at a time = {on['req_per_s'] / off['req_per_s']:.2f}x throughput")
    base = table[(False, clients[0])]["req_per_s"]
    for c in clients:
        print(f"{c} clients, batching on / 1 client one at a time = {table[(True, c)]['req_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
