"""Compiled decoding (`avjax.sample.decode`): greedy against step-by-step argmax of the full
forward, sampling's top-k / EOS rules, and beam search token for token against HF transformers'
`LlamaForCausalLM.generate(num_beams=..., length_penalty=..., do_sample=False)`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from avjax.nn.transformer import DecoderConfig  # noqa: E402
from avjax.sample.decode import beam_search, generate  # noqa: E402

VOCAB, PROMPT, NEW = 61, 5, 12


def _our_model(scan_layers: bool):
    cfg = DecoderConfig.tiny_llama(VOCAB)
    model = cfg.make(max_len=32, decode_block=8, scan_layers=scan_layers)
    tokens = jnp.zeros((2, PROMPT), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    # sharpen the distribution so greedy paths differ from a constant
    variables = jax.tree.map(lambda x: x * 3.0, variables)
    return model, variables


def _prompt(seed=0, b=2):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, PROMPT)).astype(np.int32)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_greedy_equals_argmax_of_full_forward(scan_layers):
    model, variables = _our_model(scan_layers)
    prompt = _prompt()
    full = jax.jit(lambda x: model.apply(variables, x)[0])
    seq = np.concatenate([prompt, np.zeros((2, NEW), np.int32)], axis=1)
    for i in range(PROMPT, PROMPT + NEW):  # reference: the full causal forward every step
        seq[:, i] = np.asarray(full(seq))[:, i - 1].argmax(-1)
    ref = seq[:, PROMPT:]
    out = np.asarray(generate(model, variables, prompt, NEW))
    np.testing.assert_array_equal(out, ref)
    assert len(set(ref[0].tolist())) > 1
    if scan_layers:
        return
    # EOS: the row that emits it first is padded after it, the other continues
    eos = int(ref[0, 3])
    out = np.asarray(generate(model, variables, prompt, NEW, eos_id=eos, pad_id=VOCAB - 1))
    for row, r in zip(out, ref, strict=True):
        hit = np.flatnonzero(r == eos)
        end = hit[0] + 1 if len(hit) else NEW
        np.testing.assert_array_equal(row[:end], r[:end])
        assert (row[end:] == VOCAB - 1).all()


def test_sampling_top_k_and_key():
    model, variables = _our_model(False)
    prompt = _prompt(1)
    key = jax.random.key(3)
    a = np.asarray(generate(model, variables, prompt, NEW, key=key, temperature=1.0))
    b = np.asarray(generate(model, variables, prompt, NEW, key=key, temperature=1.0))
    np.testing.assert_array_equal(a, b)  # same key, same tokens
    c = np.asarray(generate(model, variables, prompt, NEW, key=jax.random.key(4), temperature=1))
    assert (a != c).any()
    # top_k = 1 is greedy whatever the temperature
    greedy = np.asarray(generate(model, variables, prompt, NEW))
    top1 = generate(model, variables, prompt, NEW, key=key, temperature=5.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, variables, prompt, 40)


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_pair():
    from avjax.convert.llama import from_hf_llama

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=100.0),
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0)  # peaked next-token distributions: beams diverge, EOS gets picked
    model, variables = from_hf_llama(hf.state_dict(), cfg, max_len=PROMPT + NEW, decode_block=0)
    return hf, model, variables


def _hf_beams(hf, prompt, eos, num_beams, length_penalty, early_stopping=False):
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(prompt, dtype=torch.long),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=NEW,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=VOCAB - 1,
        )
    return out.numpy()[:, PROMPT:]


def _check_beams(hf, model, variables, prompt, eos, num_beams, lp, early_stopping=False):
    ref = _hf_beams(hf, prompt, eos, num_beams, lp, early_stopping)
    res = beam_search(
        model,
        variables,
        prompt,
        NEW,
        num_beams=num_beams,
        length_penalty=lp,
        early_stopping=early_stopping,
        eos_id=eos,
        pad_id=VOCAB - 1,
    )
    ours = np.asarray(res.tokens)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1] :] == VOCAB - 1).all()
    return ours, np.asarray(res.lengths)


def test_greedy_equals_transformers(hf_pair):
    hf, model, variables = hf_pair
    prompt = _prompt(2)
    ref = _hf_beams(hf, prompt, None, 1, 1.0)
    np.testing.assert_array_equal(np.asarray(generate(model, variables, prompt, NEW)), ref)


def test_beam_search_equals_transformers(hf_pair):
    hf, model, variables = hf_pair
    prompt = _prompt(5, b=3)
    # no EOS reachable: every hypothesis runs to max_new_tokens
    plain, lengths = _check_beams(hf, model, variables, prompt, VOCAB - 2, 5, 1.0)
    assert (lengths == NEW).all() and (plain != VOCAB - 2).all()
    greedy = np.asarray(generate(model, variables, prompt, NEW))
    assert (plain != greedy).any()  # beam search found something greedy did not
    # early EOS: a token the beams emit early ends some hypotheses before max_new_tokens
    eos = int(plain[0, 2])
    ended = []
    for lp, stop in ((1.0, False), (2.0, False), (0.5, True)):
        ended.append(_check_beams(hf, model, variables, prompt, eos, 5, lp, stop)[1] < NEW)
    assert ended[0].any() and ended[2].any()  # (a length penalty of 2 favours long ones)
