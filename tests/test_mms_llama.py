"""MMS-LLaMA: the text tokenizer, the model's sequence and loss, and train -> stop -> resume ->
eval through the CLI on the tiniest config."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from avjax.data.text import tokenizer as text_tok
from avjax.train import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = ["THE CAT SAT ON THE MAT", "WE SAW THE DOG AND THE CAT", "THEY WENT TO THE PARK"]


def test_bpe_round_trip_cache_and_tokenizer_json(tmp_path):
    tok, info = text_tok.prepared_bpe(TEXTS, 300, str(tmp_path))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for t in TEXTS + ["AN UNSEEN WORD 123"]:  # byte-level: anything round-trips
        ids = tok.encode(t)
        assert all(3 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == t
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0])  # merges were learned
    again, info2 = text_tok.prepared_bpe(TEXTS, 300, str(tmp_path), read_only=True)
    assert info2 == info and again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with pytest.raises(Exception, match="tokenizer"):  # read-only never builds
        text_tok.prepared_bpe(TEXTS[:2], 300, str(tmp_path), read_only=True)
    # a Llama-3-style tokenizer.json written by hand: its own special-token names are found
    lt = text_tok.train_bpe(TEXTS, 300).tokenizer
    lt.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    (tmp_path / "llama").mkdir()
    lt.save(str(tmp_path / "llama" / "tokenizer.json"))
    loaded = text_tok.load_tokenizer(str(tmp_path / "llama"))
    assert loaded.bos_id == lt.token_to_id("<|begin_of_text|>")
    assert loaded.eos_id == lt.token_to_id("<|end_of_text|>")
    assert loaded.pad_id == 0 and loaded.decode(loaded.encode(TEXTS[2])) == TEXTS[2]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        text_tok.load_tokenizer(str(tmp_path / "nothing"))
    json.loads((tmp_path / "llama" / "tokenizer.json").read_text())


# --- the model, its state and the CLI, on the tiniest config --------------------------------


def _config(cache_dir):
    spec = importlib.util.spec_from_file_location(
        "mms_cfg", os.path.join(REPO, "configs/mms_llama.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("test")
    c.data.cache_dir = str(cache_dir)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train 2 steps -> stop (checkpoint, as on SIGTERM) -> resume to 3 -> --mode=eval."""
    from avjax.main import run
    from avjax.tasks import get_task
    from avjax.train import loop
    from avjax.train.sharding import make_mesh

    root = tmp_path_factory.mktemp("mms")
    cfg, work = _config(root / "cache"), str(root / "work")
    one = make_mesh(cfg.mesh, jax.devices()[:1])  # one device: compiles in a fraction
    first = {"step": int(loop.train(get_task(cfg, work), cfg, work, one, stop_after=2).step)}
    second = {"step": int(loop.train(get_task(cfg, work), cfg, work, one).step)}
    evals = run(cfg, work, "eval")
    return {"cfg": cfg, "work": work, "first": first, "second": second, "evals": evals}


def test_stop_resume_and_eval_report(trained):
    assert trained["first"]["step"] == 2 and trained["second"]["step"] == 3
    ev = trained["evals"]
    report = json.loads(open(ev["report"]).read())
    n_eval = min(
        8, json.loads(open(os.path.join(trained["work"], "data_facts.json")).read())["eval_items"]
    )
    assert report["step"] == 3 and report["utterances"] == n_eval  # each held-out one once
    for key in ("wer_clean", "wer_snr0"):
        assert 0.0 <= report[key] and report[key] == ev[key]
    # >= qps = 3 queries per utterance of <= 32 frames (1.28 s), <= max_queries = 12
    assert 3 / 1.28 <= report["speech_tokens_per_s"] <= 12 / (1 / 25)
    assert np.isfinite(ev["eval_loss"]) and len(report["examples"]) == min(n_eval, 5)


def test_only_adapters_and_new_modules_carry_optimizer_state(trained):
    from avjax.tasks import get_task
    from avjax.train import loop
    from avjax.train.sharding import make_mesh

    cfg = trained["cfg"]
    task = get_task(cfg, trained["work"])
    task.prepare()
    trainer = loop.build_trainer(task, cfg, make_mesh(cfg.mesh))
    state = trainer.abstract_state
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    sizes = {optim.path_name(p): int(np.prod(x.shape)) for p, x in flat}
    new = ("audio_down/", "queries", "qformer/", "proj_in/", "proj_out/", "rate/")
    trained_paths = [p for p in sizes if p.endswith(("lora_a", "lora_b")) or p.startswith(new)]
    assert any("llm/blocks_0/attention/q/lora_a" == p for p in trained_paths)
    n_trained = sum(sizes[p] for p in trained_paths)
    opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt == 2 * n_trained  # Adam's two moments, for exactly these leaves
    assert n_trained < 0.5 * sum(sizes.values())
    # a command-line override of model.llm_train reaches the optimizer (groups are derived)
    cfg2 = copy.deepcopy(cfg)
    cfg2.model.llm_train = "lora+embed"
    cfg2.train.param_groups = ()
    state2 = loop.build_trainer(get_task(cfg2, trained["work"]), cfg2, make_mesh(cfg.mesh))
    leaves2 = jax.tree.leaves(state2.abstract_state.opt_state)
    opt2 = sum(int(np.prod(x.shape)) for x in leaves2 if x.ndim > 0)
    head = sizes["llm/embedding"] + sizes.get("llm/lm_head", 0)
    assert opt2 == 2 * (n_trained + head)
    cfg2.model.llm_train = "lora"  # a stale explicit param_groups is refused, not ignored
    with pytest.raises(ValueError, match="llm_train"):
        get_task(cfg2, trained["work"])


def test_loss_on_transcript_positions_only(trained):
    """Changing the targets outside the weighted (transcript + eos) positions changes nothing;
    the weights sit right after the speech slots and cover len(transcript) + 1 tokens."""
    from avjax.tasks import get_task
    from avjax.tasks.base import LossContext

    cfg = trained["cfg"]
    task = get_task(cfg, trained["work"])
    t = task.text()
    batch = task.dummy_batch()
    text = np.zeros_like(batch["text"])
    text[:, :11] = np.frombuffer(b"THE CAT SAT", np.uint8)
    batch = task._add_tokens({**batch, "text": text})
    n_ids = len(t["tok"].encode("THE CAT SAT"))
    start = len(t["prompt"]) + t["max_queries"] - 1
    w = batch["weights"][0]
    assert w.sum() == n_ids + 1 and w[start : start + n_ids + 1].all()
    assert batch["targets"][0, start + n_ids] == t["tok"].eos_id
    model = task.build_model()
    variables = task.init_variables(model, jax.random.key(0), batch)
    params = nn.meta.unbox(variables.pop("params"))
    ctx = LossContext(train=False, rng=jax.random.key(1), model_state=variables)
    loss = jax.jit(lambda b: task.apply_loss(model, params, b, ctx)[0])  # one compile
    other = batch["targets"].copy()
    other[batch["weights"] == 0] = 7
    assert np.isclose(loss(batch), loss({**batch, "targets": other}))
    moved = batch["targets"].copy()
    moved[:, start] = (moved[:, start] + 1) % t["tok"].vocab_size
    assert not np.isclose(loss(batch), loss({**batch, "targets": moved}))


def test_unused_speech_slots_are_masked(trained):
    """Transcript logits with n_q of max_queries slots used equal the LLM's on the sequence
    without the unused slots; garbage there changes nothing; a cached decoding step after the
    padded prefill equals the full forward."""
    import jax.numpy as jnp

    from avjax.models import mms_llama as mm
    from avjax.nn.lora import lora_scope
    from avjax.tasks import get_task

    task = get_task(trained["cfg"], trained["work"])
    t, batch = task.text(), task.dummy_batch()
    model = task.build_model()
    params = nn.meta.unbox(task.init_variables(model, jax.random.key(0), batch)["params"])
    p, m, w = len(t["prompt"]), t["max_queries"], model.llm.width
    tokens = jnp.asarray(batch["tokens"][:2])
    speech = jax.random.normal(jax.random.key(1), (2, m, w))
    n_q = jnp.asarray([3, m])
    with lora_scope(task.lora()):
        run = jax.jit(
            lambda sp, tk: model.apply({"params": params}, tk, sp, n_q, method="lm_logits")
        )
        logits = run(speech.at[:, 3:].set(0.0), tokens)
        noisy = run(speech.at[0, 3:].set(50.0), tokens.at[0, p : p + m - 3].set(5))
        compact = jnp.concatenate([tokens[:1, :p], tokens[:1, :3], tokens[:1, p + m :]], 1)
        embeds = jnp.zeros(compact.shape + (w,)).at[0, p : p + 3].set(speech[0, :3])
        mask = mm.speech_slots(compact.shape[1], p, 3)[None]
        ref, _ = model.llm.apply(
            {"params": params["llm"]}, compact, embeds=embeds, embeds_mask=mask
        )
    k = p + m - 1  # the last speech slot predicts the first transcript token
    np.testing.assert_allclose(logits[0, k:], ref[0, p + 2 :], atol=1e-5)
    np.testing.assert_allclose(noisy[0, k:], logits[0, k:], atol=1e-5)
    with lora_scope(task.lora()):  # unmasked zero slots (the old layout) would differ
        emb, msk, _ = mm.splice(speech.at[:, 3:].set(0.0), n_q, p, tokens.shape[1])
        plain, _ = model.llm.apply({"params": params["llm"]}, tokens, embeds=emb, embeds_mask=msk)
    assert not np.allclose(plain[0, k:], ref[0, p + 2 :], atol=1e-3)
    # decoding: prefill the prompt + slots, then one cached step at the first transcript token
    lm = mm.PrefixLM(model.llm, task.lora(), p)
    emb, msk, n_pad = mm.splice(speech.at[:, 3:].set(0.0), n_q, p, k + 1)
    v = {"params": params["llm"], "embeds": emb, "embeds_mask": msk, "n_pad": n_pad}
    pos = jnp.broadcast_to(jnp.arange(k + 1), (2, k + 1))
    first, cache = lm.apply(v, tokens[:, : k + 1], pos, return_cache=True)
    step, _ = lm.apply(v, tokens[:, k + 1 : k + 2], pos[:, -1:] + 1, cache=cache)
    np.testing.assert_allclose(first[:, -1], logits[:, k], atol=1e-5)
    np.testing.assert_allclose(step[:, 0], logits[:, k + 1], atol=1e-5)
