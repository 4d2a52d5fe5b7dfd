"""Tokenizers the project builds itself, in Hugging Face format, with a chat template.

Two kinds, both `PreTrainedTokenizerFast` objects that `save_pretrained` writes and
`AutoTokenizer.from_pretrained` reads back:

- `byte_tokenizer()`: one token per byte plus the special tokens; needs no training data,
  so a random-init model can be built from a config with no files at all (tests, benchmarks).
- `train_bpe_tokenizer(texts, vocab_size)`: byte-level BPE trained on a corpus (the task world's);
  `spell_quoted=True` keeps the letters of quoted words one token each.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "byte_tokenizer", "train_bpe_tokenizer"]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each turn is `<|role|>\n{content}</s>`; the assistant's `</s>` is part of its turn, so the
# loss teaches the model to end its answer. Rendering is prefix-consistent (rendering the
# first k messages gives a prefix of rendering all of them), which the loss mask relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


# A letter of a word that a closing quote (one not followed by a letter, so not the apostrophe of
# `can't` or `Kai's`) or the end of the text follows: the letters of `'tiger'` and of a bare
# answer ending a turn. Each becomes a token of its own, so a model sees the letters it must
# reverse, capitalise or count; BPE still merges every other word (~7% more tokens on the task
# world's corpus).
QUOTED_LETTER = r"[A-Za-z](?=[A-Za-z]*(?:'(?![A-Za-z])|\z))"


def _byte_level(model: models.Model, split_digits: bool = False, spell_quoted: bool = False) -> Tokenizer:
    tokenizer = Tokenizer(model)
    steps: list[pre_tokenizers.PreTokenizer] = []
    if spell_quoted:
        steps.append(pre_tokenizers.Split(Regex(QUOTED_LETTER), behavior="isolated"))
    # One token per digit (as in Llama and Qwen) lets a small model learn arithmetic digit
    # by digit instead of memorising a token for every number.
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Special tokens first (ids 0..6), then the 256 byte symbols: 263 tokens, no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({sym: len(SPECIAL_TOKENS) + i for i, sym in enumerate(alphabet)})
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tokenizer)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, split_digits: bool = True, spell_quoted: bool = False
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`; special tokens take ids 0..6; digits split by default;
    `spell_quoted`: one token per letter of a quoted word (QUOTED_LETTER)."""
    tokenizer = _byte_level(models.BPE(unk_token="<unk>"), split_digits, spell_quoted)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)
