"""Stage-2 training throughput: llava-gm vs the plain transformers route, same backbones, same batch, one run.

Baseline: transformers' LlavaForConditionalGeneration holding the same weights, fp32, the vision tower run
every step, logits over every position. Ours: bf16 autocast, cached vision features, logits only at labels.
Both take a full AdamW step on the projector + the LM body (the tied embedding frozen, as the offline recipe).
Prints tokens/s, the ratio, and our MFU against a matmul (in our compute precision) measured in the same run.

    python bench/train_step.py [--batch 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import easy_vqa_samples, matmul_tflops, offline_config, timed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--turns", type=int, default=4, help="question/answer pairs per sample")
    a = ap.parse_args()

    from llava_gm.config import StageConfig
    from llava_gm.data.conversation import IMAGE_TOKEN_ID
    from llava_gm.data.features import FeatureCache
    from llava_gm.export import to_hf_llava
    from llava_gm.model.build import build_model
    from llava_gm.train.loop import collate
    from llava_gm.precision import use_bf16
    from llava_gm.train.stages import plan_stage

    torch.manual_seed(0)
    model = build_model(offline_config(pool=1))  # no pooling: the baseline sees the same tokens
    samples = easy_vqa_samples(model, a.batch, a.turns)
    feats, _ = FeatureCache(model.vision_tower).features([s.image for s in samples], progress=False)
    batch = collate(samples, feats, model.tokenizer.pad_token_id, torch.device("cpu"))
    tokens = int(batch["attention_mask"].sum())
    labels = int((batch["labels"] != -100).sum())

    hf = to_hf_llava(model).train()
    from PIL import Image

    pixels = model.vision_tower.preprocess([Image.open(s.image) for s in samples])
    hf_ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, hf.config.image_token_id)
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    hf.get_input_embeddings().weight.requires_grad_(False)  # both sides: the demo's stage 2 (tied embedding frozen)
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)

    def baseline_step():
        out = hf(input_ids=hf_ids, attention_mask=batch["attention_mask"], pixel_values=pixels, labels=batch["labels"])
        out.loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    trainable = plan_stage(model, StageConfig(name="instruct", train_embeddings=False))
    bf16 = use_bf16(torch.device("cpu"))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in trainable], lr=1e-5)
    model.train()

    def our_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak = matmul_tflops(dtype=torch.bfloat16 if bf16 else torch.float32)
    t_ours = statistics.median(timed(our_step, a.steps))
    t_base = statistics.median(timed(baseline_step, a.steps))
    peak = (peak + matmul_tflops(dtype=torch.bfloat16 if bf16 else torch.float32)) / 2  # measured before and after: the machine is shared

    cfg = model.lm.config.get_text_config()
    emb = model.lm.get_input_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.lm.named_parameters()) - emb
    width = batch["input_ids"].shape[1]
    attn = 4 * width * width * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * a.batch
    proj = sum(p.numel() for p in model.projector.parameters())
    flops = 6 * (body + proj) * tokens + 3 * attn + 4 * emb * labels  # forward + backward; the head (frozen) only at labels
    print(f"batch {a.batch} samples, {tokens} tokens ({labels} labelled), {a.steps} timed steps each (median)")
    print(f"baseline (transformers Llava, fp32, vision every step, full logits): {t_base:7.2f} s/step  {tokens / t_base:8.0f} tok/s")
    print(f"llava-gm ({'bf16' if bf16 else 'fp32'} (precision auto), cached features, logits at labels): {t_ours:7.2f} s/step  {tokens / t_ours:8.0f} tok/s")
    print(f"speed-up: {t_base / t_ours:.2f}x   (target >= 4x)")
    print(f"{'bf16' if bf16 else 'fp32'} matmul peak measured now: {peak:.2f} TFLOP/s; our model FLOPs {flops / 1e12:.2f} TFLOP/step -> MFU {flops / t_ours / 1e12 / peak:.1%}")


if __name__ == "__main__":
    main()
