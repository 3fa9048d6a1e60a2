"""Latency of one image + question -> short answer: llava-gm's Answerer vs transformers' generate, same weights.

Both run the vision tower on the image (a new image is not in any cache), then produce exactly --new-tokens
tokens greedily. Baseline: LlavaForConditionalGeneration.generate in fp32. Ours: the Answerer (precision auto,
our KV-cache loop); --pool N lets ours average image tokens first (same weights, fewer tokens for the LM);
--compile adds a third row: the Answerer with torch.compile'd vision tower and decode steps (its one-off
compile time is printed apart: it is paid once per process and shape).

    python bench/answer_latency.py [--runs 20] [--new-tokens 4] [--pool 4] [--compile]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import ROOT, offline_config, timed


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--pool", type=int, default=1, help="projector pooling for ours (the baseline cannot pool)")
    ap.add_argument("--compile", action="store_true", help="also time the Answerer with compile=True")
    a = ap.parse_args()

    from PIL import Image

    from llava_gm.data.conversation import IMAGE_TOKEN_ID, ConversationEncoder
    from llava_gm.data.easy_vqa import build_easy_vqa
    from llava_gm.export import to_hf_llava
    from llava_gm.infer import Answerer
    from llava_gm.model.build import build_model

    torch.manual_seed(0)
    model = build_model(offline_config(pool=1))
    hf = to_hf_llava(model)
    image = Image.open(build_easy_vqa(ROOT / "runs" / "data" / "easy-vqa") / "images" / "test" / "0.png").convert("RGB")
    question = "<image>\nwhat color is the shape?\nAnswer the question using a single word or phrase."
    enc = ConversationEncoder(model.tokenizer, model.num_image_tokens, 4096)
    ids = enc.encode_prompt([{"role": "user", "content": question}])
    hf_ids = torch.tensor([[hf.config.image_token_id if t == IMAGE_TOKEN_ID else t for t in ids]])
    n = a.new_tokens

    def baseline():
        with torch.no_grad():
            pixels = model.vision_tower.preprocess([image])
            out = hf.generate(input_ids=hf_ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, hf_ids.shape[1]:].tolist()

    if a.pool > 1:  # same weights; the projector averages image tokens first, so the LM sees fewer of them
        model.projector.pool = a.pool
        model.num_image_tokens = model.projector.num_tokens(model.vision_tokens)
    answerer = Answerer(model)  # precision auto: bf16 on GPUs / AMX CPUs, else fp32 (the baseline keeps its own fp32 copy)
    answerer.stop_ids = []  # exactly n tokens, as the baseline

    def ours():
        return answerer.answer([{"prompt": question, "image": image}], max_new_tokens=n, progress=False)[0]

    runners = {"baseline (transformers generate, fp32)": baseline, "llava-gm (Answerer, KV cache)": ours}
    t_compile = None
    if a.compile:
        compiled = Answerer(model, compile=True)
        compiled.stop_ids = []

        def ours_compiled():
            return compiled.answer([{"prompt": question, "image": image}], max_new_tokens=n, progress=False)[0]

        t_compile = timed(ours_compiled, 1, warmup=0)[0]  # the first answer compiles the tower, prefill and step
        runners["llava-gm (Answerer, compile=True)"] = ours_compiled
    outputs = {name: fn() for name, fn in runners.items()}  # also the warm-up
    # interleaved, one run of each in turn: the machine is shared, and drift then hits every contestant alike
    times: dict = {name: [] for name in runners}
    for _ in range(a.runs):
        for name, fn in runners.items():
            times[name] += timed(fn, 1, warmup=0)
    print(f"{a.runs} runs each, interleaved, {n} new tokens, baseline prompt {len(ids)} tokens; ours: {model.num_image_tokens} "
          f"image tokens, {str(next(answerer.model.lm.parameters()).dtype).replace('torch.', '')}")
    base_name = next(iter(runners))
    base = statistics.median(times[base_name])
    for name, ts in times.items():
        m = statistics.median(ts)
        ratio = "" if name == base_name else f"   {base / m:.2f}x faster"
        print(f"{name:40s} median {m * 1000:7.1f} ms  p90 {pct(ts, 0.9) * 1000:7.1f} ms{ratio}")
    if t_compile is not None:
        print(f"(compile=True: the first answer compiled for {t_compile:.1f} s; paid once per process and shape)")
    outputs[base_name] = model.tokenizer.decode(outputs[base_name])
    print("target: >= 3x faster;  answers: " + "; ".join(f"{name}: {out!r}" for name, out in outputs.items()))


if __name__ == "__main__":
    main()
