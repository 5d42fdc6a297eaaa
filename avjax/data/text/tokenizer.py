"""Text tokenisation with HuggingFace `tokenizers`: load a Llama directory's `tokenizer.json`,
or train a byte-level BPE or a word-level vocabulary on a corpus' transcripts (for tiny LLMs).

    tok = load_tokenizer("/models/Llama-3.2-3B")        # its tokenizer.json
    tok = prepared_bpe(texts, vocab_size=256, cache_dir=...)  # trained once, cached
    tok = prepared_words(texts, cache_dir=...)          # one id per distinct word
    ids = tok.encode("HELLO WORLD")                     # list[int], no special tokens
    tok.decode(ids) == "HELLO WORLD"

A trained tokenizer is a prepared artifact (`avjax.data.artifacts`): a folder holding
`tokenizer.json`, keyed by a hash of the transcripts, the kind and the vocabulary size, so
every run on the same corpus gets the same ids and read-only modes (eval) never retrain it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Special-token spellings tried, in order, when loading a user's tokenizer.json.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]")
PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "[PAD]")


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` with its bos / eos / pad ids.

    `pad_id` is `eos_id` when the tokenizer has no pad token (Llama 3 has none); padded
    positions are masked by the caller, so the id only has to be valid.
    """

    tokenizer: tokenizers.Tokenizer
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        """Ids are in `[0, vocab_size)` (added tokens included)."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """`text` -> ids without bos / eos (the caller places them)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Several texts at once (`encode` each)."""
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), False)]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; special tokens (bos / eos / pad) are dropped."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str) -> None:
        """Writes `tokenizer.json` to `path` (a file name)."""
        self.tokenizer.save(path)


def _first_id(tok: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for n in names:
        i = tok.token_to_id(n)
        if i is not None:
            return int(i)
    return None


def load_tokenizer(
    path: str, bos: str | None = None, eos: str | None = None, pad: str | None = None
) -> TextTokenizer:
    """A tokenizer from `path`: a `tokenizer.json` file or a directory holding one.

    bos / eos / pad name the special tokens; by default the usual spellings are tried
    (Llama 3's `<|begin_of_text|>` / `<|end_of_text|>`, `<s>` / `</s>`, ...). Raises naming
    the file when it is missing or has no bos / eos token.
    """
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no tokenizer.json (expected a Llama / HF directory)")
    tok = tokenizers.Tokenizer.from_file(file)
    ids = {}
    for what, given, names in (("bos", bos, BOS_NAMES), ("eos", eos, EOS_NAMES)):
        ids[what] = _first_id(tok, (given,) if given else names)
        if ids[what] is None:
            raise ValueError(f"{file}: no {what} token among {[given] if given else names}")
    pad_id = _first_id(tok, (pad,) if pad else PAD_NAMES)
    return TextTokenizer(tok, ids["bos"], ids["eos"], ids["eos"] if pad_id is None else pad_id)


def train_bpe(texts: Sequence[str], vocab_size: int = 256) -> TextTokenizer:
    """A byte-level BPE trained on `texts`: the 256 byte symbols, merges up to `vocab_size`
    (counting the three specials `<pad>`=0, `<s>`=1, `</s>`=2). Deterministic in `texts`."""
    if vocab_size < 3 + 256:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs >= 259 (256 bytes + 3)")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return TextTokenizer(tok, tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD))


def train_word_level(texts: Sequence[str]) -> TextTokenizer:
    """A word-level vocabulary over `texts`: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, then
    every distinct word (whitespace- and punctuation-split, sorted) once. For a closed
    corpus vocabulary a word is one token, so a tiny LLM predicts whole words (a word outside
    the texts encodes as `<unk>`). Deterministic in the set of `texts`' words."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {s: i for i, s in enumerate([PAD, BOS, EOS, UNK] + words)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.add_special_tokens([PAD, BOS, EOS, UNK])  # (ids unchanged: already in the vocab)
    return TextTokenizer(tok, vocab[BOS], vocab[EOS], vocab[PAD])


def prepared_text_tokenizer(
    texts: Sequence[str], kind: str, vocab_size: int, cache_dir: str, read_only: bool = False
) -> tuple[TextTokenizer, dict[str, Any]]:
    """`kind`: "bpe" (`prepared_bpe(texts, vocab_size, ...)`) | "word" (`prepared_words`,
    `vocab_size` unused: the texts' words set it)."""
    if kind == "bpe":
        return prepared_bpe(texts, vocab_size, cache_dir, read_only)
    if kind == "word":
        return prepared_words(texts, cache_dir, read_only)
    raise ValueError(f"tokenizer kind {kind!r}: expected 'bpe' or 'word'")


def prepared_bpe(
    texts: Sequence[str], vocab_size: int, cache_dir: str, read_only: bool = False
) -> tuple[TextTokenizer, dict[str, Any]]:
    """`train_bpe(texts, vocab_size)` as a prepared artifact under
    `cache_dir/text_bpe/<key>/tokenizer.json`, built once (read-only: never built; a missing
    one is an error naming it). Returns (tokenizer, {"path", "key"})."""
    fields = {"kind": "byte-bpe", "vocab_size": int(vocab_size)}
    build = lambda t: train_bpe(t, vocab_size)  # noqa: E731
    return _prepared(texts, fields, build, cache_dir, "the transcript BPE tokenizer", read_only)


def prepared_words(
    texts: Sequence[str], cache_dir: str, read_only: bool = False
) -> tuple[TextTokenizer, dict[str, Any]]:
    """`train_word_level(texts)` as a prepared artifact (as `prepared_bpe`, under
    `cache_dir/text_bpe/<key>/tokenizer.json`)."""
    fields = {"kind": "word-level"}
    what = "the transcript word-level tokenizer"
    return _prepared(texts, fields, train_word_level, cache_dir, what, read_only)


def _prepared(
    texts: Sequence[str],
    fields: dict[str, Any],
    train: Any,
    cache_dir: str,
    what: str,
    read_only: bool,
) -> tuple[TextTokenizer, dict[str, Any]]:
    """`train(sorted(texts))`'s tokenizer.json, prepared once under a key of `fields` and
    the texts."""
    from avjax.data import artifacts

    fields = {**fields, "texts": artifacts.fingerprint(sorted(texts))}
    key = artifacts.fingerprint(fields)
    folder = os.path.join(cache_dir, "text_bpe", key)

    def build(tmp: Any) -> dict[str, Any]:
        train(sorted(texts)).save(os.path.join(os.fspath(tmp), "tokenizer.json"))
        return {"texts": len(texts)}

    artifacts.prepare_artifact(folder, fields, build, what=what, read_only=read_only)
    tok = load_tokenizer(folder, bos=BOS, eos=EOS, pad=PAD)
    return tok, {"path": folder, "key": key}
