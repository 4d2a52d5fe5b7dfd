import pytest

from alignkit.data.io import DataError
from alignkit.data.tokenize import IGNORE, EncodeStats, encode_conversation, fit_length

CHAT = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "2."},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]


def loss_text(tokenizer, example):
    """The text of the tokens that carry loss, each run of them joined, runs separated by |."""
    runs, current = [], []
    for token, target in zip(example.input_ids[1:], example.target_ids[:-1]):
        if target != IGNORE:
            assert target == token  # shifted targets are the next tokens
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return "|".join(runs)


def test_multi_turn_mask_covers_assistant_turns_only(tokenizer):
    example = encode_conversation(tokenizer, CHAT, None, "x:1")
    assert loss_text(tokenizer, example) == "2.</s>|It is 4.</s>"
    assert example.target_ids[-1] == IGNORE
    # the text round-trips: nothing lost in tokenization
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_mask_with_bpe_tokenizer_that_merges_across_boundaries():
    from alignkit.models.tokenizer import train_bpe_tokenizer

    corpus = [tokenizer_text for tokenizer_text in ["<|assistant|>\nIt is 4.</s>", "It is 2. It is 4."] * 50]
    bpe = train_bpe_tokenizer(corpus, vocab_size=300)
    example = encode_conversation(bpe, CHAT, None, "x:1")
    assert loss_text(bpe, example) == "2.</s>|It is 4.</s>"


def test_custom_template_and_missing_template(tokenizer):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    example = encode_conversation(tokenizer, CHAT[1:3], template, "x:1")
    assert loss_text(tokenizer, example) == "2.\n"
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(DataError, match="x:1: the tokenizer has no chat template"):
        encode_conversation(bare, CHAT, None, "x:1")


def test_template_that_is_not_prefix_consistent_is_an_error(tokenizer):
    # renders the number of messages first: a prefix render is not a prefix of the full one
    template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="not prefix-consistent"):
        encode_conversation(tokenizer, CHAT, template, "x:1")


def test_overlength_policies(tokenizer):
    example = encode_conversation(tokenizer, CHAT[1:3], None, "f.jsonl:3")
    n = len(example.input_ids)
    stats = EncodeStats()
    assert fit_length(example, n, "error", stats) is example
    with pytest.raises(DataError, match=rf"f.jsonl:3: example has {n} tokens, more than data.max_seq_len={n - 1}"):
        fit_length(example, n - 1, "error", stats)
    assert fit_length(example, n - 1, "drop", stats) is None
    truncated = fit_length(example, n - 2, "truncate", stats)
    assert len(truncated.input_ids) == n - 2 and truncated.target_ids == example.target_ids[: n - 2]
    # a prompt that fills the context leaves no response token: dropped and counted, not trained on
    assert fit_length(example, 10, "truncate", stats) is None
    assert stats.truncated == 1
    assert sum(stats.dropped.values()) == 2
    assert "no response token left" in stats.summary()


def test_text_records_train_on_every_token(tokenizer):
    from alignkit.data.tokenize import encode_text

    example = encode_text(tokenizer, "abc", "t:1")
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.target_ids == example.input_ids[1:] + [IGNORE]
    assert encode_text(tokenizer, "abc</s>", "t:2").input_ids == example.input_ids  # no doubled EOS
