"""`llava-gm chat`: a multi-turn conversation in the terminal, answers printed as they are generated.

Commands: /image PATH (talk about another image: starts a new conversation), /reset (forget the
conversation, keep the image), /quit (or end of input).
"""

from __future__ import annotations

import sys
from typing import Optional

from ..engine.core import Sampling, Sequence
from ..errors import LlavaGMError
from ..images import load_image

HELP = "commands: /image PATH, /reset, /quit"


class Chat:
    def __init__(self, answerer, sampling: Sampling, out=None):
        self.answerer, self.sampling = answerer, sampling
        self.out = out or sys.stdout
        self.features = None  # the image's features, encoded once
        self.messages: list[dict] = []

    @classmethod
    def from_checkpoint(cls, path, max_tokens=256, temperature=0.0, top_p=1.0, seed: Optional[int] = None) -> "Chat":
        from ..infer import Answerer

        return cls(Answerer.from_checkpoint(path), Sampling(max_tokens, temperature, top_p, seed))

    def set_image(self, path: Optional[str]) -> None:
        """Talk about this image (None: no image) from a new conversation; a bad file changes nothing."""
        self.features = self.answerer.image_features([load_image(path)])[0] if path else None
        self.messages = []

    def say(self, text: str) -> str:
        """Answer one user message, printing the answer as it streams; returns it."""
        content = f"<image>\n{text}" if self.features is not None and not self.messages else text
        messages = self.messages + [{"role": "user", "content": content}]
        prompt = self.answerer.encoder.encode_prompt(messages)
        seq = Sequence(prompt, image=self.features if self.features is not None else None, sampling=self.sampling)
        engine = self.answerer.engine
        batch = engine.prefill([seq])
        while batch is not None:
            batch = engine.step(batch)
            self.out.write(seq.take_text())
            self.out.flush()
        self.out.write("\n")
        self.messages = messages + [{"role": "assistant", "content": seq.text}]
        return seq.text

    def run(self, image: Optional[str] = None, stdin=None) -> None:
        stdin = stdin or sys.stdin
        self.set_image(image)
        self.out.write(f"chatting with {self.answerer.model_id}" + (f" about {image}" if image else "") + f" ({HELP})\n")
        while True:
            self.out.write("> ")
            self.out.flush()
            line = stdin.readline()
            if not line or line.strip() == "/quit":
                return
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                self.messages = []
                self.out.write("(new conversation)\n")
            elif line.startswith("/image"):
                path = line[len("/image"):].strip()
                try:
                    self.set_image(path or None)
                    self.out.write(f"(new conversation about {path})\n" if path else "(no image)\n")
                except LlavaGMError as e:
                    self.out.write(f"error: {e}\n")
            elif line.startswith("/"):
                self.out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            else:
                self.say(line)
