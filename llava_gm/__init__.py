"""llava-gm: lightweight sparse vision-language models (LLaVA-GM, LLaVA-Gemma, Eve)."""

__version__ = "0.1.0"
