"""The inference engine: one place for generation (prefill with shared image prefixes, decode steps, sampling,
stop handling, one KV cache) over typed decoder backends. `LlavaGM` stays a plain module; `Answerer`, the
server and `llava-gm chat` all generate through `Engine`.

Names are imported lazily: model/fast_lm.py imports the cache from here, and the engine imports the model.
"""

_NAMES = {
    "KVCache": "cache",
    "Backend": "backends",
    "TransformersBackend": "backends",
    "FastBackend": "backends",
    "CompiledBackend": "backends",
    "choose_backend": "backends",
    "Engine": "core",
    "Batch": "core",
    "Sampling": "core",
    "Sequence": "core",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(name)
