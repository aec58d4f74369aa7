import pytest

from dataflow.errors import InputError
from dataflow.rollout.data import Conversation
from dataflow.rollout.template import set_chat_template, tokenize_sample
from dataflow.rollout.testing import llama3_style_tokenizer, smollm2_tokenizer

CONVERSATION = (
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And in Python?"},
    {"role": "assistant", "content": "```python\nprint(2 + 2)\n```\nIt prints 4."},
)
REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tokenizer_and_eot(request):
    if request.param == "chatml":
        return smollm2_tokenizer(), "<|im_end|>"
    return llama3_style_tokenizer(), "<|eot_id|>"


def masked_text(tokenizer, tokenized, skip_special_tokens=False):
    ids = [t for t, m in zip(tokenized.input_ids, tokenized.loss_mask) if m]
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_masked_tokens_decode_to_exactly_the_assistant_replies_and_their_end_of_turn(tokenizer_and_eot):
    tokenizer, eot = tokenizer_and_eot
    tokenized = tokenize_sample(tokenizer, Conversation(id="a", messages=CONVERSATION), max_length=4096)
    assert masked_text(tokenizer, tokenized) == "".join(r + eot for r in REPLIES)
    assert masked_text(tokenizer, tokenized, skip_special_tokens=True) == "".join(REPLIES)
    rendered = tokenizer.apply_chat_template(list(CONVERSATION), tokenize=True, return_dict=True)
    assert tokenized.input_ids == rendered["input_ids"]


def test_train_only_last_turn_masks_only_the_final_reply(tokenizer_and_eot):
    tokenizer, eot = tokenizer_and_eot
    tokenized = tokenize_sample(tokenizer, Conversation(id="a", messages=CONVERSATION), max_length=4096,
                                train_only_last_turn=True)
    assert masked_text(tokenizer, tokenized) == REPLIES[-1] + eot


def test_truncation_cuts_ids_and_mask_together(tokenizer_and_eot):
    tokenizer, eot = tokenizer_and_eot
    full = tokenize_sample(tokenizer, Conversation(id="a", messages=CONVERSATION), max_length=4096)
    cut = len(full.input_ids) - 5
    truncated = tokenize_sample(tokenizer, Conversation(id="a", messages=CONVERSATION), max_length=cut)
    assert truncated.input_ids == full.input_ids[:cut] and truncated.loss_mask == full.loss_mask[:cut]


def test_a_sample_without_assistant_tokens_is_none(tokenizer_and_eot):
    tokenizer, _ = tokenizer_and_eot
    prompt_only = Conversation(id="a", messages=CONVERSATION[:2])
    assert tokenize_sample(tokenizer, prompt_only, max_length=4096) is None
    first_reply_cut_off = tokenize_sample(tokenizer, Conversation(id="a", messages=CONVERSATION), max_length=10)
    assert first_reply_cut_off is None


def test_text_rows_train_on_every_token():
    tokenizer = smollm2_tokenizer()
    tokenized = tokenize_sample(tokenizer, Conversation(id="t", text="Plain pre-formatted text."), max_length=64)
    assert all(tokenized.loss_mask) and tokenizer.decode(tokenized.input_ids) == "Plain pre-formatted text."


def test_a_tokenizer_without_chat_template_needs_one_given(tmp_path):
    tokenizer = smollm2_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(InputError, match="--chat-template"):
        set_chat_template(tokenizer, tmp_path, None)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    set_chat_template(tokenizer, tmp_path, str(template))
    assert tokenizer.chat_template == template.read_text()


def test_a_chat_template_file_that_cannot_be_read_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="--chat-template .*cannot read it"):
        set_chat_template(smollm2_tokenizer(), tmp_path, str(tmp_path / "missing.jinja"))
