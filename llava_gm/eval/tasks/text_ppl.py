"""Perplexity of the language model on a plain text file (text only, no image, no chat template).

Eve checks that text-only behaviour survives the vision stages; perplexity on held-out text is the quickest
check. The text is read whole and scored in consecutive windows of `stride` tokens (Answerer.perplexity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...errors import LlavaGMError
from ..base import Loaded, Problems, Question, Task


class TextPPL(Task):
    name = "text_ppl"
    version = "1"
    default_split = "file"
    official = "none: exp(mean token negative log-likelihood) over non-overlapping windows"
    metric_variant = "token perplexity, windows of `stride` tokens each starting after BOS"
    prompt_template = "the file's text, as is"
    kind = "perplexity"

    def option_defaults(self):
        return {"stride": 512, "name": ""}

    def load(self, data: str, split: Optional[str], image_folder: Optional[str], problems: Problems) -> Loaded:
        path = Path(data).expanduser()
        if not path.is_file():
            raise LlavaGMError(f"text file not found at {path}")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise LlavaGMError(f"{path} is empty")
        self.options["name"] = self.options["name"] or f"PPL {path.stem}"
        return Loaded([Question("text", text, None, None, {"characters": len(text)}, str(path))], split or "file", [str(path)])

    def score(self, questions, predictions):
        ppl = predictions["text"]
        return {"perplexity": ppl, "characters": questions[0].meta["characters"]}, {"text": {"perplexity": ppl}}

    def headline(self, metrics):
        return {self.options["name"] or "PPL": metrics.get("perplexity")}
