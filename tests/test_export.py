"""Exports: transformers' Llava (+ processor) computes what the model computes; llava-gm's folder loads back in one call."""

import asyncio
import dataclasses

import pytest
import torch

import llava_gm
from llava_gm.cli import main
from llava_gm.config import LanguageConfig, ModelConfig, SparseConfig, VisionConfig
from llava_gm.data.conversation import IMAGE_TOKEN_ID, ConversationEncoder
from llava_gm.errors import LlavaGMError
from llava_gm.export import export_hf, export_llava_gm, hf_export_problem, to_hf_llava
from llava_gm.infer import Answerer
from llava_gm.model.build import build_model

import tiny

QUESTION = "what color is the shape?"


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("LLAVA_GM_PRECISION", "fp32")  # the same numbers on both sides on any host


@pytest.fixture(scope="module")
def backbones(tmp_path_factory, tiny_lm_dir, tiny_vision_dir):
    """Tiny random towers and LMs by name, saved with save_pretrained (made once per module)."""
    made = {"dinov2": tiny_vision_dir, "gemma3": tiny_lm_dir}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = tiny.make_vision(folder, kind=name) if name in ("clip", "siglip") else tiny.make_lm(folder, family=name)
        return made[name]

    return get


def _model(vision, language, **projector):
    cfg = ModelConfig(vision=VisionConfig(name=str(vision)), language=LanguageConfig(name=str(language)))
    cfg.projector = dataclasses.replace(cfg.projector, **projector)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _check_hf_folder(model, folder, image):
    """Processor ids and pixels, logits and the greedy answer of the saved folder equal ours."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    ids = ConversationEncoder(model.tokenizer, model.num_image_tokens, 512).encode_prompt([{"role": "user", "content": f"<image>\n{QUESTION}"}])
    assert inputs["input_ids"][0].tolist() == [hf.config.image_token_id if t == IMAGE_TOKEN_ID else t for t in ids]
    pixels = model.vision_tower.preprocess([image])
    assert torch.equal(inputs["pixel_values"], pixels)
    with torch.no_grad():
        ours = model.logits_from_hidden(model.decoder(inputs_embeds=model.embed(torch.tensor([ids]), model.vision_tower(pixels))).last_hidden_state)
        theirs = hf(**inputs).logits
    vocab = ours.shape[-1]
    assert theirs.shape[-1] in (vocab, vocab + 1)  # + the added placeholder, whose logit generation suppresses
    assert torch.allclose(ours, theirs[..., :vocab], atol=1e-5), (ours - theirs[..., :vocab]).abs().max()
    out = hf.generate(**inputs, max_new_tokens=8)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == Answerer(model, dtype=torch.float32).answer([{"prompt": QUESTION, "image": image}], max_new_tokens=8, progress=False)[0]


@pytest.mark.parametrize("vision,language", [("dinov2", "gemma3"), ("clip", "gemma"), ("siglip", "gemma3")])
def test_hf_export_loads_with_auto_classes_and_computes_the_same(tmp_path, backbones, vision, language):
    model = _model(backbones(vision), backbones(language))
    export_hf(model, tmp_path / "hf")
    _check_hf_folder(model, tmp_path / "hf", tiny.draw_shape("red", "circle", size=40).crop((0, 0, 40, 30)))


def test_hf_export_reuses_an_image_token_the_vocabulary_has(tmp_path, backbones):
    """A tokenizer with a single-token <image> and a padded embedding table: no new row, the logits keep their width."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, tok = AutoModelForCausalLM.from_pretrained(backbones("gemma3")), AutoTokenizer.from_pretrained(backbones("gemma3"))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    lm.resize_token_embeddings(len(tok) + 7)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    model = _model(backbones("dinov2"), tmp_path / "lm")
    hf = to_hf_llava(model)
    assert hf.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert hf.config.text_config.vocab_size == model.lm.config.vocab_size
    export_hf(model, tmp_path / "hf")
    _check_hf_folder(model, tmp_path / "hf", tiny.draw_shape("blue", "triangle"))


def test_models_transformers_llava_cannot_compute_are_refused_with_the_reason(tmp_path, backbones, tiny_model_config):
    model = build_model(tiny_model_config)
    assert hf_export_problem(model) is None
    for change, reason in [({"pool": 2}, "pools image tokens"), ({"type": "linear"}, "'linear'"), ({"word_tokens": True}, "words")]:
        model.cfg = dataclasses.replace(tiny_model_config, projector=dataclasses.replace(tiny_model_config.projector, **change))
        assert reason in hf_export_problem(model)
    model = build_model(dataclasses.replace(tiny_model_config, sparse=SparseConfig(kind="moe")))
    with pytest.raises(LlavaGMError, match="sparse \\(MOE\\) layers.*--format llava-gm"):
        export_hf(model, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    with pytest.raises(LlavaGMError, match="final_logit_softcapping"):  # Gemma 2: transformers' Llava drops the cap
        to_hf_llava(_model(backbones("dinov2"), backbones("gemma2")))


def test_llava_gm_folder_round_trip_of_a_sparse_model(tmp_path, tiny_model_config, shapes_data):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_model_config, sparse=SparseConfig(kind="moe", num_experts=3)))
    with torch.no_grad():  # experts that differ from each other, as after stage 3
        for name, p in model.lm.named_parameters():
            if "experts" in name or "router" in name:
                p.add_(torch.randn_like(p) * 0.05)
    export_llava_gm(model, tmp_path / "export")
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"config.yaml", "model.safetensors", "language", "vision"}
    loaded = llava_gm.load(tmp_path / "export", dtype=torch.float32)
    assert loaded.model.sparse_layers == model.sparse_layers
    mine, theirs = model.state_dict(), loaded.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine)
    items = [{"prompt": QUESTION, "image": shapes_data.parent / "images" / f"{i}.png"} for i in range(3)]
    assert loaded.answer(items, max_new_tokens=5, progress=False) == Answerer(model, dtype=torch.float32).answer(items, max_new_tokens=5, progress=False)


def test_export_command(tmp_path, tiny_checkpoint, shapes_data, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", tiny_checkpoint, "--format", "hf", "--output", str(out)]) == 0
    assert (out / "config.json").is_file()
    assert main(["export", "--checkpoint", tiny_checkpoint, "--format", "hf", "--output", str(out)]) == 2
    assert "exists; choose a new output folder or pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--checkpoint", tiny_checkpoint, "--format", "llava-gm", "--output", str(out), "--overwrite"]) == 0
    assert (out / "config.yaml").is_file() and not (out / "config.json").exists()  # replaced whole, nothing left over
    items = [{"prompt": QUESTION, "image": shapes_data.parent / "images" / "0.png"}]
    assert llava_gm.load(out, dtype=torch.float32).answer(items, max_new_tokens=5, progress=False) == \
        Answerer.from_checkpoint(tiny_checkpoint, dtype=torch.float32).answer(items, max_new_tokens=5, progress=False)
    # an export exports again (here to transformers' format), and a folder that is no model is one clear error
    assert main(["export", "--checkpoint", str(out), "--format", "hf", "--output", str(tmp_path / "again")]) == 0
    with pytest.raises(LlavaGMError, match="no such model folder"):
        llava_gm.load(tmp_path / "nothing")


@pytest.mark.offline_backbones
def test_hf_export_of_the_offline_backbones(tmp_path):
    """Gemma 3 270M + DINOv2-S/14 at 112 px (the offline default without pooling and word tokens, random projector):
    `<start_of_image>` is the reused image token, and the processor, logits and greedy answer equal ours."""
    from llava_gm.config import RecipeConfig, load_yaml

    from test_offline_backbones import _user_cache

    recipe = load_yaml(RecipeConfig, "recipes/offline-default.yaml")
    cfg = dataclasses.replace(recipe.model, projector=dataclasses.replace(recipe.model.projector, pool=1, word_tokens=False),
                              sparse=SparseConfig(kind="none"))
    with _user_cache():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
    export_hf(model, tmp_path / "hf")
    assert to_hf_llava(model).config.image_token_id == model.tokenizer.convert_tokens_to_ids("<start_of_image>")
    _check_hf_folder(model, tmp_path / "hf", tiny.draw_shape("red", "circle", size=64))


def test_every_command_takes_an_export_folder_as_its_checkpoint(tmp_path, tiny_checkpoint, shapes_data, capsys, monkeypatch):
    """ask, answer, eval, serve and chat read a `llava-gm export --format llava-gm` folder as they read the checkpoint
    it came from: the same answers, and the folder's name as the model id."""
    import io
    import json

    import httpx
    import uvicorn

    from llava_gm.eval import samples

    export = tmp_path / "my-export"
    assert main(["export", "--checkpoint", tiny_checkpoint, "--format", "llava-gm", "--output", str(export)]) == 0
    capsys.readouterr()
    image = shapes_data.parent / "images" / "0.png"

    def ask(ckpt):
        assert main(["ask", "--checkpoint", ckpt, "--image", str(image), "--question", QUESTION, "--max-new-tokens", "5"]) == 0
        return capsys.readouterr().out

    assert ask(str(export)) == ask(tiny_checkpoint)

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.png", "text": QUESTION}) + "\n" for i in range(3)))
    texts = {}
    for name, ckpt in (("export", export), ("ckpt", tiny_checkpoint)):
        out = tmp_path / f"answers-{name}.jsonl"
        assert main(["answer", "--checkpoint", str(ckpt), "--questions", str(questions), "--image-folder", str(image.parent),
                     "--output", str(out), "--max-new-tokens", "5"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        texts[name] = [r["text"] for r in rows]
        if name == "export":
            assert {r["model_id"] for r in rows} == {"my-export"}
    assert texts["export"] == texts["ckpt"]

    data = samples.write_samples(tmp_path / "samples")["easy_vqa"]
    results = {}
    for name, ckpt in (("export", export), ("ckpt", tiny_checkpoint)):
        out = tmp_path / f"eval-{name}.json"
        assert main(["eval", "--checkpoint", str(ckpt), "--task", "easy_vqa", "--data", data, "--output", str(out), "--no-progress"]) == 0
        results[name] = json.loads(out.read_text())["metrics"]
    assert results["export"] == results["ckpt"]
    capsys.readouterr()

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.setdefault("app", app))  # the app `serve` built, not run
    assert main(["serve", "--checkpoint", str(export)]) == 0
    app = served["app"]

    async def chat():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            models = (await c.get("/v1/models")).json()
            body = {"model": "my-export", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5, "temperature": 0}
            return models, (await c.post("/v1/chat/completions", json=body)).json()

    try:
        models, reply = asyncio.run(chat())
    finally:
        app.state.scheduler.stop()
    assert models["data"][0]["id"] == "my-export"
    alone = Answerer.from_checkpoint(tiny_checkpoint).answer([{"prompt": QUESTION}], max_new_tokens=5, progress=False)[0]
    assert reply["choices"][0]["message"]["content"] == alone

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/quit\n"))
    assert main(["chat", "--checkpoint", str(export), "--max-new-tokens", "5"]) == 0
    assert alone in capsys.readouterr().out
