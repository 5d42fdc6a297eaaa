"""SpeechTransformer task: SpeechSSM's data, loss and sampling with a Transformer LM.

A composition, as `avjax.tasks.speechssm`: the same data module
(`avjax.data.speech.speech_lm.SpeechLMData`) and the same loss / sampling / evaluation functions
(`avjax.tasks.speech_lm`), with the decoder of `avjax.models.speechtransformer`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from avjax.data.speech.speech_lm import SpeechLMData
from avjax.data.speech.units import UNIT_RATE
from avjax.models import speechtransformer as speechtransformer_lib
from avjax.tasks import speech_lm
from avjax.tasks.base import Batch, Metrics, Task

# Keys of config.model that size the decoding cache only; they never change the parameters.
DECODE_ONLY_KEYS = ("max_len", "decode_block")


class SpeechTransformerTask(Task):
    """The Transformer baseline of SpeechSSM (same units, data, loss and sampler).

    Attributes:
      data: the data module (prepared on first use; `read_only` is its flag).
    """

    name = "speechtransformer"

    def __init__(self, config, workdir):
        self.data = SpeechLMData.from_config(config, workdir)
        super().__init__(config, workdir)

    # --- model ------------------------------------------------------------------------------
    def cache_len(self) -> int:
        """KV-cache length: `config.model.max_len`, or (0) enough for `config.sample`'s prompt
        and continuation, rounded up to whole `decode_block`s (at least one training window)."""
        mc, sc = self.config.model, self.config.sample
        if int(mc.max_len) > 0:
            return int(mc.max_len)
        prompt = max(1, int(round(sc.prompt_seconds * UNIT_RATE)))
        need = max(prompt + int(round(sc.seconds * UNIT_RATE)), int(self.config.data.seq_len))
        block = int(mc.decode_block) or 1
        return -(-need // block) * block

    def build_model(self) -> nn.Module:
        return speechtransformer_lib.speechtransformer(
            self.config.model, int(self.config.data.num_units), self.cache_len()
        )

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"tokens": batch["inputs"], "segment_pos": batch["segment_pos"]}

    def loss(self, model, params, batch, rng) -> tuple[jax.Array, Metrics]:
        logits, _ = model.apply({"params": params}, **self.model_inputs(batch))
        return speech_lm.next_token_loss(logits, batch["targets"], batch["mask"])

    def flops_per_token(self) -> float:
        return speechtransformer_lib.flops_per_token(
            self.config.model, int(self.config.data.num_units), int(self.config.data.seq_len)
        )

    def compatibility(self) -> dict[str, Any]:
        model = self.config.model.to_dict()
        return {
            "task": self.name,
            "model": {k: v for k, v in model.items() if k not in DECODE_ONLY_KEYS},
            **self.data.compatibility(),
            "seed": int(self.config.seed),
        }

    # --- inference --------------------------------------------------------------------------
    def sample(self, model, params, step: int) -> dict[str, Any]:
        return speech_lm.sample_continuations(
            model, params, step, self.data, self.config, self.workdir, "SpeechTransformer"
        )

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        return speech_lm.evaluate_lm(
            self.name, model, params, step, eval_loss, self.data, self.config, self.workdir
        )
