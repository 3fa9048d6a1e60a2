"""The task registry: one module per benchmark, looked up by name."""

from __future__ import annotations

from typing import Optional

from ...errors import LlavaGMError
from ..base import Task
from .easy_vqa import EasyVQA
from .gqa import GQA
from .lang_mc import LangMC
from .mmbench import MMBench
from .mme import MME
from .mmvp import MMVP
from .pope import POPE
from .scienceqa_img import ScienceQAImg
from .text_ppl import TextPPL
from .textvqa import TextVQA
from .vqav2 import VQAv2

# in the order the papers' tables use; the summary table follows it
TASKS: dict[str, type[Task]] = {t.name: t for t in (VQAv2, GQA, ScienceQAImg, TextVQA, POPE, MME, MMBench, MMVP,
                                                    EasyVQA, LangMC, TextPPL)}


def get_task(name: str, options: Optional[dict] = None) -> Task:
    if name not in TASKS:
        raise LlavaGMError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](options)
