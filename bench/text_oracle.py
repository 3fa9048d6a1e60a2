"""Upper bound for easy-VQA yes/no: the same stage-2 recipe when the image's content is given as text.

The stage-2 models answer yes/no exactly as the wording rule does (negated -> yes, else no), which raises the
question whether the LM can learn the check at all in the demo's budget. This trains stage 2 from the base LM on
--samples training questions whose prompt holds the stage-1 caption ("A red circle.") instead of the
image, with the offline recipe's stage-2 settings, then answers the first --limit test questions the same way.
Named baseline: the wording rule on the same test questions (it never reads the caption).

    python bench/text_oracle.py [--samples 3200] [--limit 1000]     # ~4 min on the 2-core host
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

from _common import ROOT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3200, help="training questions (the demo's stage 2 uses 3,200)")
    ap.add_argument("--limit", type=int, default=1000, help="test questions to answer")
    a = ap.parse_args()

    from llava_gm.config import RecipeConfig, load_yaml
    from llava_gm.data.easy_vqa import _describe, _load, caption, question_type, yes_no_form
    from llava_gm.eval.tasks.easy_vqa import easy_vqa_normalize
    from llava_gm.infer import Answerer
    from llava_gm.train.run import run_stage

    def with_captions(split: str) -> list[tuple[str, str]]:
        per_image, _ = _load(split)
        out = []
        for image_id in sorted(per_image):
            described = caption(*_describe(per_image[image_id]))
            out += [(f"{described}\n{q}", ans) for q, ans in per_image[image_id]]
        return out

    recipe = load_yaml(RecipeConfig, ROOT / "recipes" / "offline-default.yaml")
    model_cfg = dataclasses.replace(recipe.model, sparse=dataclasses.replace(recipe.model.sparse, kind="none"))
    stage = next(s for s in recipe.stages if s.name == "instruct")
    train = with_captions("train")
    random.Random(0).shuffle(train)
    test = with_captions("test")[: a.limit]
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        rows = [{"id": f"text-{k}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": ans}]}
                for k, (p, ans) in enumerate(train)]
        data = Path(tmp) / "text.json"
        data.write_text(json.dumps(rows))
        t = time.time()
        run_stage(dataclasses.replace(stage, data=str(data), image_folder=tmp, max_samples=a.samples), f"{tmp}/model",
                  model_cfg=model_cfg, say=lambda m: None)
        seconds = time.time() - t
        answers = Answerer.from_checkpoint(f"{tmp}/model").answer([{"prompt": p, "image": None} for p, _ in test], batch_size=64)

    right, total, rule_right = {}, {}, 0
    for (prompt, truth), pred in zip(test, answers):
        kind = question_type(truth)
        total[kind] = total.get(kind, 0) + 1
        right[kind] = right.get(kind, 0) + (easy_vqa_normalize(pred) == truth)
        if kind == "yes_no":
            rule_right += (truth == "yes") == yes_no_form(prompt.split("\n")[-1])[0]
    print(f"stage 2 on {a.samples} captioned questions: {seconds:.0f} s; first {len(test)} test questions")
    for kind in ("yes_no", "shape", "color"):
        print(f"  {kind:7s} {100 * right[kind] / total[kind]:6.2f}%  ({right[kind]}/{total[kind]})")
    print(f"  overall {100 * sum(right.values()) / len(test):6.2f}%")
    yes_no = 100 * right["yes_no"] / total["yes_no"]
    rule = 100 * rule_right / total["yes_no"]
    print(f"wording rule (baseline) on the same yes/no questions: {rule:.2f}%; caption-as-text model / rule: {yes_no / rule:.2f}x")


if __name__ == "__main__":
    main()
