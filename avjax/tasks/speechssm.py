"""SpeechSSM task: next-unit prediction over long speech documents; long-form sampling.

A composition: the data module `avjax.data.speech.speech_lm.SpeechLMData` (corpus, units, vocoder,
windows, prompts), the Griffin model of `avjax.models.speechssm`, the next-unit loss and the
sampling / evaluation functions of `avjax.tasks.speech_lm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from avjax.data.speech import pipeline
from avjax.data.speech.speech_lm import SpeechLMData
from avjax.models import speechssm as speechssm_lib
from avjax.tasks import speech_lm
from avjax.tasks.base import Batch, Metrics, Task

_choose_splits = pipeline.choose_splits  # (moved to avjax.data.speech.pipeline)


# Model fields that change only how fresh parameters are drawn, never the checkpoint's meaning.
INIT_ONLY = ("out_init_scale",)


class SpeechSSMTask(Task):
    """Spoken LM over 25 Hz speech units with the Griffin backbone.

    Attributes:
      data: the data module (prepared on first use; `read_only` is its flag).
    """

    name = "speechssm"

    def __init__(self, config, workdir):
        self.data = SpeechLMData.from_config(config, workdir)
        super().__init__(config, workdir)

    # --- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return speechssm_lib.speechssm(self.config.model, int(self.config.data.num_units))

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"tokens": batch["inputs"], "segment_pos": batch["segment_pos"]}

    def loss(self, model, params, batch, rng) -> tuple[jax.Array, Metrics]:
        logits, _ = model.apply({"params": params}, **self.model_inputs(batch))
        return speech_lm.next_token_loss(logits, batch["targets"], batch["mask"])

    def flops_per_token(self) -> float:
        return speechssm_lib.flops_per_token(
            self.config.model, int(self.config.data.num_units), int(self.config.data.seq_len)
        )

    def compatibility(self) -> dict[str, Any]:
        return {
            "task": self.name,
            # `out_init_scale` only shapes a fresh init: workdirs from before it resume
            "model": {k: v for k, v in self.config.model.to_dict().items() if k not in INIT_ONLY},
            **self.data.compatibility(),  # the units: other units make the weights meaningless
            "seed": int(self.config.seed),
        }

    # --- inference --------------------------------------------------------------------------
    def sample(self, model, params, step: int) -> dict[str, Any]:
        """Continues held-out prompts (`speech_lm.sample_continuations`: WAV, PNG, units)."""
        return speech_lm.sample_continuations(
            model, params, step, self.data, self.config, self.workdir, "SpeechSSM"
        )

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        """Perplexity, unigram entropy and the long-form metrics (`speech_lm.evaluate_lm`)."""
        return speech_lm.evaluate_lm(
            self.name, model, params, step, eval_loss, self.data, self.config, self.workdir
        )
