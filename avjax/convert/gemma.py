"""Import HuggingFace `GemmaForCausalLM` (Gemma 1) weights into avjax's `TransformerLM`.

`from_hf_gemma(state_dict, hf_config)` takes the PyTorch state dict (torch tensors, numpy arrays
or a lazy mapping such as `avjax.convert.llama.HFTensors(dir)`) and the config
(`transformers.GemmaConfig` or its `config.json` dict) and returns our module and variables
such that

    logits, _ = model.apply(variables, input_ids)      # [batch, length, vocab]

equals `GemmaForCausalLM(hf_config)(input_ids).logits`. `load_hf_gemma(dir)` does the same from a
local directory written by `save_pretrained` (nothing is downloaded; safetensors read tensor by
tensor).

Gemma's tensors are named and laid out as Llama's (see `avjax.convert.llama` for the mapping);
the architecture differs: GeGLU with the tanh GELU (HF's legacy `hidden_act="gelu"` means the
same), embeddings scaled by sqrt(width) and tied, RMSNorm scales stored as offsets from 1 (so
copied, not shifted: our `norm_offset=True`), full-dimension RoPE, head dim independent of the
width (Gemma-7B: 16 x 256 = 4096 query dims on a 3072 width), no biases, no logit soft-cap.
Gemma-2B is `DecoderConfig.gemma_2b()`: 18 layers, width 2048, 8 query heads, 1 KV head of 256,
GeGLU 16,384, vocabulary 256,000.
"""

from __future__ import annotations

from typing import Any

from avjax.convert import llama
from avjax.nn.transformer import DecoderConfig, TransformerLM

_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # all the tanh form here


def gemma_config(hf_config: Any) -> DecoderConfig:
    """Our `DecoderConfig` for a HF `GemmaConfig` (object or config.json dict)."""
    act = llama.cfg_get(hf_config, "hidden_activation", None) or llama.cfg_get(
        hf_config, "hidden_act", "gelu_pytorch_tanh"
    )
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r}: Gemma's MLP is GeGLU (tanh GELU)")
    if not llama.cfg_get(hf_config, "tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings=False: Gemma ties its output embedding")
    return DecoderConfig.gemma(
        **llama.shapes_from_config(hf_config),
        norm_eps=float(llama.cfg_get(hf_config, "rms_norm_eps", 1e-6)),
    )


def from_hf_gemma(
    state_dict: Any, hf_config: Any, **options: Any
) -> tuple[TransformerLM, dict[str, Any]]:
    """`(model, variables)` equal to HF `GemmaForCausalLM(hf_config)` with `state_dict` loaded.

    `options` go to the module (max_len, decode_block, dtype, scan_layers, remat).
    """
    cfg = gemma_config(hf_config)
    return cfg.make(**options), {"params": llama.convert_state_dict(state_dict, cfg, "Gemma")}


def load_hf_gemma(path: str, **options: Any) -> tuple[TransformerLM, dict[str, Any]]:
    """`from_hf_gemma` on a local directory as written by `save_pretrained` (no network)."""
    return from_hf_gemma(llama.HFTensors(path), llama.read_hf_config(path, "gemma"), **options)


def save_converted(model: TransformerLM, variables: dict[str, Any], out_dir: str) -> None:
    """Writes `out_dir/params` (orbax, float32) and `out_dir/model.json` (the architecture)."""
    llama.save_converted(model, variables, out_dir)


def load_converted(out_dir: str, **options: Any) -> tuple[TransformerLM, dict[str, Any]]:
    """Reads what `save_converted` wrote: `(model, {"params": ...})`."""
    return llama.load_converted(out_dir, "tools/convert_gemma.py", **options)
