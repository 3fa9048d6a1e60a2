"""Render LLaVA conversations through the LM's chat template into token ids + labels.

One template serves training and inference: the tokenizer's own chat template (the offline
Gemma gets Google's Gemma template once, when it is converted). Labels cover only the model's
turns; a sample whose labels cannot be lined up with its turns is an error naming the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LlavaGMError

IGNORE_INDEX = -100
IMAGE_TOKEN_ID = -200  # placeholder id in input_ids where projected image features go
IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant"}


class SampleError(LlavaGMError):
    """A sample that cannot be used as it is; `sample_id` names it."""

    def __init__(self, sample_id: str, message: str):
        super().__init__(f"sample {sample_id}: {message}")
        self.sample_id = sample_id


@dataclass
class Encoded:
    input_ids: list[int]  # IMAGE_TOKEN_ID marks image-feature slots
    labels: list[int]  # IGNORE_INDEX outside the model's turns


def to_messages(conversations: list, sample_id: str) -> list[dict]:
    """LLaVA `conversations` ([{from, value}]) -> chat messages ([{role, content}]), checked."""
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(sample_id, "'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(sample_id, f"turn {i} must be an object with 'from' and 'value'")
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise SampleError(sample_id, f"turn {i}: unknown speaker {turn['from']!r} (use 'human' or 'gpt')")
        if not isinstance(turn["value"], str):
            raise SampleError(sample_id, f"turn {i}: 'value' must be a string")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise SampleError(sample_id, f"turn {i} is from {turn['from']!r}; turns must alternate human, gpt, human, ...")
        messages.append({"role": role, "content": turn["value"]})
    return messages


class ConversationEncoder:
    """Turns chat messages into ids and labels with a tokenizer's chat template."""

    def __init__(self, tokenizer, num_image_tokens: int, max_length: int):
        if not getattr(tokenizer, "chat_template", None):
            raise LlavaGMError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; set one (tokenizer.chat_template = ...) "
                "so that training and inference render conversations the same way"
            )
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokens of `text` with <image> expanded into image slots, and each token's character span."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for k, piece in enumerate(text.split(IMAGE_TAG)):
            if k > 0:
                ids += [IMAGE_TOKEN_ID] * self.num_image_tokens
                spans += [(pos - len(IMAGE_TAG), pos)] * self.num_image_tokens
            if piece:
                enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                spans += [(pos + a, pos + b) for a, b in enc["offset_mapping"]]
            pos += len(piece) + len(IMAGE_TAG)
        return ids, spans

    def encode(self, messages: list[dict], sample_id: str = "?") -> Encoded:
        """Training sample: the whole conversation, labels on every model turn (its text and end-of-turn)."""
        full = self.render(messages)
        targets = []  # character ranges of the model turns in `full`
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (full.startswith(before) and full.startswith(upto) and upto.startswith(before)):
                raise SampleError(sample_id, f"turn {i} does not render as a prefix of the conversation; the chat template cannot be split into turns")
            end = len(upto.rstrip())  # the model turn ends with its end-of-turn marker, not the newline after it
            if end <= len(before):
                raise SampleError(sample_id, f"turn {i} (gpt) renders empty")
            targets.append((len(before), end, i))
        if not targets:
            raise SampleError(sample_id, "has no gpt turn to learn from")
        ids, spans = self._tokenize(full)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end, turn in targets:
            hit = [j for j, (a, b) in enumerate(spans) if a >= start and b <= end and b > a]
            covered = "".join(full[spans[j][0] : spans[j][1]] for j in hit)
            if not hit or covered.strip() != full[start:end].strip():
                raise SampleError(sample_id, f"the tokens of turn {turn} (gpt) do not line up with its text; check the chat template and tokenizer")
            for j in hit:
                labels[j] = ids[j]
        if len(ids) > self.max_length:
            raise SampleError(sample_id, f"is {len(ids)} tokens long, over the limit of {self.max_length} (language.max_length); shorten it or raise the limit")
        return Encoded(ids, labels)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Inference prompt: the conversation so far plus the model-turn opener."""
        ids, _ = self._tokenize(self.render(messages, add_generation_prompt=True))
        return ids
