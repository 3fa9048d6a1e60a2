"""llava-gm: lightweight sparse vision-language models (LLaVA-GM, LLaVA-Gemma, Eve)."""

__version__ = "0.1.0"


def load(path, **answerer_kwargs):
    """A model folder, exported (`llava-gm export --format llava-gm`) or a training checkpoint, as an Answerer:
    `llava_gm.load("my-model").answer([{"prompt": "what is this?", "image": "cat.png"}])`. Keyword arguments go to
    `Answerer` (dtype, device, fast)."""
    from .export import load

    return load(path, **answerer_kwargs)
