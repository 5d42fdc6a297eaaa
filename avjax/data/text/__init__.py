"""Text: tokenizers (`tokenizer`: a user's `tokenizer.json` or a byte-level BPE trained on a
corpus' transcripts, cached as a prepared artifact)."""
