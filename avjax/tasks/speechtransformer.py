"""SpeechTransformer task: SpeechSSM's units, data, loss and sampling with a Transformer LM."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from avjax.data.units import UNIT_RATE
from avjax.models import speechtransformer as speechtransformer_lib
from avjax.tasks.speechssm import SpeechSSMTask

# Keys of config.model that size the decoding cache only; they never change the parameters.
DECODE_ONLY_KEYS = ("max_len", "decode_block")


class SpeechTransformerTask(SpeechSSMTask):
    """The Transformer baseline of SpeechSSM (same units, data, loss and sampler)."""

    name = "speechtransformer"

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

    def flops_per_token(self) -> float:
        return speechtransformer_lib.flops_per_token(
            self.config.model, int(self.config.data.num_units), int(self.config.data.seq_len)
        )

    def compatibility(self) -> dict[str, Any]:
        facts = super().compatibility()
        facts["model"] = {
            k: v for k, v in self.config.model.to_dict().items() if k not in DECODE_ONLY_KEYS
        }
        return facts
