"""Label masks through the Gemma chat template: only the model's turns (text + <end_of_turn>) are learned."""

import pytest

from llava_gm.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID, ConversationEncoder, SampleError, to_messages


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    from llava_gm.backbones.language import load_tokenizer

    return load_tokenizer(str(tiny_lm_dir))


def conv(*turns):
    return to_messages([{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)], "t")


def labelled_text(tok, enc):
    runs, cur = [], []
    for i, l in zip(enc.input_ids, enc.labels):
        if l != IGNORE_INDEX:
            cur.append(l)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_gemma_template_renders_official_format(tok):
    text = tok.apply_chat_template(conv("hi", "yes"), tokenize=False)
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyes<end_of_turn>\n"


def test_single_turn_labels_cover_answer_and_end_of_turn(tok):
    enc = ConversationEncoder(tok, num_image_tokens=4, max_length=512).encode(conv("<image>\nwhat color is the shape?", "red"))
    assert labelled_text(tok, enc) == ["red<end_of_turn>"]
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == 4
    assert all(l == IGNORE_INDEX for i, l in zip(enc.input_ids, enc.labels) if i == IMAGE_TOKEN_ID)
    assert enc.input_ids[0] == tok.bos_token_id


def test_multi_turn_labels_every_model_turn_and_nothing_else(tok):
    enc = ConversationEncoder(tok, 4, 512).encode(conv("<image>\nwhat color is the shape?", "blue", "is there a circle?", "no", "what is the shape?", "A green triangle."))
    assert labelled_text(tok, enc) == ["blue<end_of_turn>", "no<end_of_turn>", "A green triangle.<end_of_turn>"]
    # the prompt for inference is exactly the training text up to the model's first answer
    prompt = ConversationEncoder(tok, 4, 512).encode_prompt(conv("<image>\nwhat color is the shape?"))
    first_label = next(i for i, l in enumerate(enc.labels) if l != IGNORE_INDEX)
    assert enc.input_ids[:first_label] == prompt


def test_over_long_sample_is_an_error_naming_it(tok):
    enc = ConversationEncoder(tok, 4, 512)
    n = len(enc.encode(conv("<image>\nwhat color is the shape?", "red")).input_ids)
    with pytest.raises(SampleError, match=r"sample cut-me: is \d+ tokens long, over the limit of 10"):
        ConversationEncoder(tok, 4, max_length=10).encode(conv("<image>\nwhat color is the shape?", "red"), "cut-me")
    assert n > 10


def test_conversation_without_model_turn_is_an_error(tok):
    with pytest.raises(SampleError, match="no gpt turn"):
        ConversationEncoder(tok, 4, 512).encode(conv("<image>\nhello"), "lonely")


def test_turns_must_alternate():
    with pytest.raises(SampleError, match="turn 1"):
        to_messages([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "x")
    with pytest.raises(SampleError, match="unknown speaker"):
        to_messages([{"from": "robot", "value": "a"}], "x")


def test_template_that_does_not_split_into_turns_is_an_error(tok):
    import copy

    t = copy.deepcopy(tok)
    # a template that re-renders earlier turns differently once an answer exists cannot be split into turns
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(SampleError, match="prefix"):
        ConversationEncoder(t, 4, 512).encode(conv("q", "a"), "odd")
