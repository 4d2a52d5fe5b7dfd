from transformers import AutoTokenizer

from alignkit.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, byte_tokenizer, train_bpe_tokenizer


def test_byte_tokenizer_round_trips_any_text_and_saves_in_hf_format(tmp_path):
    tok = byte_tokenizer()
    assert len(tok) == 263 and tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(7))
    text = "héllo wörld 😀 </s> 12"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and tok.eos_token_id in ids
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids and loaded.chat_template == CHAT_TEMPLATE


def test_bpe_tokenizer_splits_digits_and_keeps_special_tokens(tmp_path):
    corpus = ["<|user|>\nWhat is 123 + 456?</s><|assistant|>\n123 + 456 = 579.</s>"] * 200
    tok = train_bpe_tokenizer(corpus, vocab_size=400)
    pieces = tok.convert_ids_to_tokens(tok("579", add_special_tokens=False)["input_ids"])
    assert pieces == ["5", "7", "9"]
    ids = tok(corpus[0], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == corpus[0] and tok.convert_tokens_to_ids("<|assistant|>") in ids
    assert len(ids) < len(corpus[0]) / 2  # merges happened
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nhi</s><|assistant|>\n"


def test_bpe_tokenizer_can_spell_quoted_words(tmp_path):
    exchange = "<|user|>\nReverse the word 'tiger'.</s><|assistant|>\nThe reverse of 'tiger' is 'regit'. I can't.</s>"
    corpus = [exchange] * 200
    corpus += ["<|user|>\nWrite 'stone' in capital letters.</s><|assistant|>\nSTONE</s>"] * 200
    merged, spelled = train_bpe_tokenizer(corpus, vocab_size=400), train_bpe_tokenizer(corpus, 400, spell_quoted=True)
    text = "The reverse of 'tiger' is 'regit'. I can't, Kai's."
    assert "tiger" in "".join(merged.tokenize(text)).split("'")[1] and len(merged.tokenize("'tiger'")) < 5
    pieces = spelled.tokenize(text)
    assert [p for p in pieces if p.isalpha() and len(p) == 1][:10] == list("tigerregit")
    assert spelled.tokenize("I can't, Kai's.") == merged.tokenize("I can't, Kai's.")  # apostrophes are not quotes
    assert spelled.tokenize("STONE") == list("STONE")  # a bare answer ending the text
    ids = spelled(corpus[1], add_special_tokens=False)["input_ids"]
    assert spelled.decode(ids) == corpus[1]
    spelled.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).tokenize(text) == pieces
