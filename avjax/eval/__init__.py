"""Evaluation: evaluators from the config (`evaluators`: `config.evals`, registry, runner),
per-time-slice long-form metrics (`metrics`), offline ASR (`asr`), text embeddings
(`text_embed`) and the long-form report (`longform.evaluate_longform`, evaluator type
"longform")."""
