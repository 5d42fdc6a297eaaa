"""Evaluation: per-time-slice long-form metrics (`metrics`), offline ASR (`asr`), text
embeddings (`text_embed`) and the long-form report (`longform.evaluate_longform`)."""
