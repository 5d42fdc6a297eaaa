"""MMS-LLaMA: the text tokenizer, the model's sequence and loss, and train -> stop -> resume ->
eval through the CLI on the tiniest config."""

from __future__ import annotations

import json

import pytest

from avjax.data.text import tokenizer as text_tok

TEXTS = ["THE CAT SAT ON THE MAT", "WE SAW THE DOG AND THE CAT", "THEY WENT TO THE PARK"]


def test_bpe_round_trip_cache_and_tokenizer_json(tmp_path):
    tok, info = text_tok.prepared_bpe(TEXTS, 300, str(tmp_path))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for t in TEXTS + ["AN UNSEEN WORD 123"]:  # byte-level: anything round-trips
        ids = tok.encode(t)
        assert all(3 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == t
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0])  # merges were learned
    again, info2 = text_tok.prepared_bpe(TEXTS, 300, str(tmp_path), read_only=True)
    assert info2 == info and again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with pytest.raises(Exception, match="tokenizer"):  # read-only never builds
        text_tok.prepared_bpe(TEXTS[:2], 300, str(tmp_path), read_only=True)
    # a Llama-3-style tokenizer.json written by hand: its own special-token names are found
    lt = text_tok.train_bpe(TEXTS, 300).tokenizer
    lt.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    (tmp_path / "llama").mkdir()
    lt.save(str(tmp_path / "llama" / "tokenizer.json"))
    loaded = text_tok.load_tokenizer(str(tmp_path / "llama"))
    assert loaded.bos_id == lt.token_to_id("<|begin_of_text|>")
    assert loaded.eos_id == lt.token_to_id("<|end_of_text|>")
    assert loaded.pad_id == 0 and loaded.decode(loaded.encode(TEXTS[2])) == TEXTS[2]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        text_tok.load_tokenizer(str(tmp_path / "nothing"))
    json.loads((tmp_path / "llama" / "tokenizer.json").read_text())
