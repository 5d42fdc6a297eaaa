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
from compile_settings import cheap_compiles

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


def test_word_level_tokenizer_one_id_per_word(tmp_path):
    tok, info = text_tok.prepared_text_tokenizer(TEXTS, "word", 0, str(tmp_path))
    words = sorted({w for t in TEXTS for w in t.split()})
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 4 + len(words)  # <pad> <s> </s> <unk> + each word once
    for t in TEXTS:
        ids = tok.encode(t)
        assert len(ids) == len(t.split()) and min(ids) >= 4
        assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == t
    unk = tok.tokenizer.token_to_id(text_tok.UNK)
    assert tok.encode("THE ZEBRA") == [tok.encode("THE")[0], unk]
    again, info2 = text_tok.prepared_text_tokenizer(TEXTS, "word", 0, str(tmp_path), True)
    assert info2 == info and again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    bpe = text_tok.prepared_text_tokenizer(TEXTS, "bpe", 300, str(tmp_path))[1]
    assert bpe["key"] != info["key"]  # (one cache folder, keyed by kind)
    with pytest.raises(ValueError, match="'bpe' or 'word'"):
        text_tok.prepared_text_tokenizer(TEXTS, "chars", 0, str(tmp_path))


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


@pytest.fixture(scope="module", autouse=True)
def _cheap_compiles(tmp_path_factory):
    """Compiling dominates this module: `compile_settings.cheap_compiles` for it only."""
    with cheap_compiles(str(tmp_path_factory.mktemp("jax_cache"))):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The :test config (its tiny corpus cached under a temp dir) and a workdir."""
    root = tmp_path_factory.mktemp("mms")
    (root / "work").mkdir()
    return {"cfg": _config(root / "cache"), "work": str(root / "work")}


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    """train 2 steps -> stop (checkpoint, as on SIGTERM) -> resume to 3 -> --mode=eval.
    Audio only and no loss eval while training (the eval mode's covers it): each of the four
    programs compiles without the video encoder (the AV path is `built`'s)."""
    from avjax.main import run
    from avjax.tasks import get_task
    from avjax.train import loop
    from avjax.train.sharding import make_mesh

    cfg, work = copy.deepcopy(env["cfg"]), str(tmp_path_factory.mktemp("mms_cli"))
    cfg.model.video_encoder, cfg.evals.eval.every = "none", 0
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


def test_only_adapters_and_new_modules_carry_optimizer_state(env):
    from avjax.tasks import get_task
    from avjax.train import loop
    from avjax.train.sharding import make_mesh

    cfg = env["cfg"]
    task = get_task(cfg, env["work"])
    task.prepare()
    trainer = loop.build_trainer(task, cfg, make_mesh(cfg.mesh))
    state = trainer.abstract_state
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    sizes = {optim.path_name(p): int(np.prod(x.shape)) for p, x in flat}
    new = ("mel_frontend/", "queries", "qformer/", "proj_in/", "proj_out/", "rate/")
    trained_paths = [p for p in sizes if p.endswith(("lora_a", "lora_b")) or p.startswith(new)]
    assert any("llm/blocks_0/attention/q/lora_a" == p for p in trained_paths)
    n_trained = sum(sizes[p] for p in trained_paths)
    opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt == 2 * n_trained  # Adam's two moments, for exactly these leaves
    lora = sum(v for p, v in sizes.items() if p.endswith(("lora_a", "lora_b")))
    assert 0 < lora < 0.5 * sum(v for p, v in sizes.items() if p.startswith("llm/")) - lora
    # a command-line override of model.llm_train reaches the optimizer (groups are derived)
    cfg2 = copy.deepcopy(cfg)
    cfg2.model.llm_train = "lora+embed"
    cfg2.train.param_groups = ()
    state2 = loop.build_trainer(get_task(cfg2, env["work"]), cfg2, make_mesh(cfg.mesh))
    leaves2 = jax.tree.leaves(state2.abstract_state.opt_state)
    opt2 = sum(int(np.prod(x.shape)) for x in leaves2 if x.ndim > 0)
    head = sizes["llm/embedding"] + sizes.get("llm/lm_head", 0)
    assert opt2 == 2 * (n_trained + head)
    cfg2.model.llm_train = "lora"  # a stale explicit param_groups is refused, not ignored
    with pytest.raises(ValueError, match="llm_train"):
        get_task(cfg2, env["work"])


@pytest.fixture(scope="module")
def built(env):
    """The :test task, its dummy batch, model and initial variables (one jitted init)."""
    from avjax.tasks import get_task

    task = get_task(env["cfg"], env["work"])
    batch = task.dummy_batch()
    model = task.build_model()
    init = jax.jit(lambda r: task.init_variables(model, r, batch))
    return task, batch, model, dict(nn.meta.unbox(init(jax.random.key(0))))


def test_loss_on_transcript_positions_only(built):
    """Changing the targets outside the weighted (transcript + eos) positions changes nothing;
    the weights sit right after the speech slots and cover len(transcript) + 1 tokens."""
    from avjax.tasks.base import LossContext

    task, batch, model, variables = built
    variables = dict(variables)
    t = task.text()
    text = np.zeros_like(batch["text"])
    text[:, :11] = np.frombuffer(b"THE CAT SAT", np.uint8)
    batch = task._add_tokens({**batch, "text": text})
    n_ids = len(t["tok"].encode("THE CAT SAT"))
    start = len(t["prompt"]) + t["max_queries"] - 1
    w = batch["weights"][0]
    assert w.sum() == n_ids + 1 and w[start : start + n_ids + 1].all()
    assert batch["targets"][0, start + n_ids] == t["tok"].eos_id
    params = variables.pop("params")
    ctx = LossContext(train=False, rng=jax.random.key(1), model_state=variables)
    loss = jax.jit(lambda b: task.apply_loss(model, params, b, ctx)[0])  # one compile
    other = batch["targets"].copy()
    other[batch["weights"] == 0] = 7
    assert np.isclose(loss(batch), loss({**batch, "targets": other}))
    moved = batch["targets"].copy()
    moved[:, start] = (moved[:, start] + 1) % t["tok"].vocab_size
    assert not np.isclose(loss(batch), loss({**batch, "targets": moved}))
    # the log-mel front-end reads only the first `length` frames (normalisation included)
    rng, edge = np.random.default_rng(0), 640 * (int(batch["length"][0]) // 2)
    audio = rng.normal(0, 0.1, batch["audio"].shape).astype(np.float32)
    batch = {**batch, "audio": audio, "length": np.full_like(batch["length"], edge // 640)}
    after, before = audio.copy(), audio.copy()
    after[:, edge + 640 :] *= 5.0
    before[:, : edge - 640] *= 5.0
    assert np.isclose(loss(batch), loss({**batch, "audio": after}), rtol=1e-5)
    assert not np.isclose(loss(batch), loss({**batch, "audio": before}), rtol=1e-5)


def test_unused_speech_slots_are_masked(built):
    """Transcript logits with n_q of max_queries slots used equal the LLM's on the sequence
    without the unused slots; garbage there changes nothing; a cached decoding step after the
    padded prefill equals the full forward."""
    import jax.numpy as jnp

    from avjax.models import mms_llama as mm
    from avjax.nn.lora import lora_scope

    task, batch, model, variables = built
    t, params = task.text(), variables["params"]
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


def test_real_encoders_load(env, tmp_path):
    """`model.whisper_dir` (a tiny WhisperModel saved by transformers) and
    `model.video_encoder="avhubert"` + `model.avhubert_ckpt` (a tiny fairseq-style checkpoint):
    their weights land in the initial variables; the audio encoder equals transformers'."""
    import argparse

    import jax.numpy as jnp
    import torch
    import transformers

    from avjax.convert.avhubert import to_fairseq_state_dict
    from avjax.data.speech.whisper_features import log_mel_from_audio
    from avjax.nn.avhubert import AVHubertConfig, AVHubertEncoder
    from avjax.tasks import get_task

    torch.manual_seed(0)
    hf_cfg = transformers.WhisperConfig(
        d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=64,
        num_mel_bins=128, max_source_positions=64, max_target_positions=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    hf = transformers.WhisperModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "whisper")
    av_cfg = AVHubertConfig.tiny()
    video = jnp.zeros((1, 4, 16, 16))
    audio = jnp.zeros((1, 4, av_cfg.audio_feat_dim))
    av_vars = nn.meta.unbox(AVHubertEncoder(av_cfg).init(jax.random.key(3), audio, video))
    sd = {k: torch.from_numpy(v) for k, v in to_fairseq_state_dict(av_vars, av_cfg).items()}
    args = argparse.Namespace(encoder_attention_heads=4, layer_norm_first=True)
    torch.save({"args": args, "cfg": None, "model": sd}, tmp_path / "avhubert.pt")

    cfg = copy.deepcopy(env["cfg"])
    cfg.model.whisper_dir = str(tmp_path / "whisper")
    cfg.model.video_encoder, cfg.model.avhubert_ckpt = "avhubert", str(tmp_path / "avhubert.pt")
    task = get_task(cfg, env["work"])
    batch = task.dummy_batch()
    model = task.build_model()
    variables = nn.meta.unbox(
        jax.jit(lambda r: task.init_variables(model, r, batch))(jax.random.key(0))
    )
    got = variables["params"]["video_encoder"]["avhubert"]
    want = {k: v for k, v in av_vars["params"].items() if k != "frontend"}  # (audio side unused)
    jax.tree.map(np.testing.assert_array_equal, {k: got[k] for k in want}, want)
    np.testing.assert_array_equal(
        got["frontend"]["video_proj"]["kernel"],
        av_vars["params"]["frontend"]["video_proj"]["kernel"],
    )
    # 128 mel bins as Whisper large-v3: the model's front-end follows the loaded encoder.
    mel = log_mel_from_audio(jnp.asarray(batch["audio"][:2], jnp.float32), 128)  # [2, 128, 128]
    ours = model.apply(variables, mel, method=lambda m, x: m.audio_encoder(x))
    with torch.no_grad():
        ref = hf.encoder(torch.from_numpy(np.asarray(mel))).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    tokens, n_q, _ = jax.jit(
        lambda v: model.apply(
            v, batch["audio"], batch["video"], batch["length"], method="speech_tokens"
        )
    )(variables)
    assert tokens.shape == (len(n_q), task.text()["max_queries"], model.llm.width)
    assert np.isfinite(np.asarray(tokens)).all()


def test_quantized_frozen_llm_base(env, built):
    """model.llm_base_dtype=nf4: the frozen LLM projections are held as NF4 codes + scales
    (~0.5 byte per weight) outside the differentiated params, the adapters stay float32 and
    carry the optimizer state, a train step runs, and the loss is close to the float base's
    from the same init."""
    import re

    from avjax.nn import quant
    from avjax.tasks import get_task
    from avjax.tasks.base import LossContext
    from avjax.train import loop
    from avjax.train.sharding import make_mesh

    f_task, batch, model, variables = built
    rest = {k: v for k, v in variables.items() if k != "params"}
    ctx = LossContext(False, jax.random.key(0), model_state=rest)
    f_loss, f_m, _ = jax.jit(lambda p: f_task.apply_loss(model, p, batch, ctx))(variables["params"])
    cfg = copy.deepcopy(env["cfg"])
    cfg.model.llm_base_dtype, cfg.model.llm_quant_block = "nf4", 32
    task = get_task(cfg, env["work"])
    trainer = loop.build_trainer(task, cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    with jax.set_mesh(trainer.mesh):
        state = trainer.init_fn(jax.random.key(int(cfg.seed)))
        state = jax.tree.map(np.asarray, state)  # (the step donates it)
        new, metrics = trainer.train_step(state, batch)
    # (at init the adapters add nothing, so the step's loss is the base's; no model dropout)
    q_loss = float(metrics["loss"])
    assert int(new.step) == 1 and np.isfinite(q_loss)
    assert abs(q_loss - float(f_loss / f_m["weight"])) < 0.05 * float(f_loss / f_m["weight"])
    name = lambda t: {optim.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    f_llm, q_llm = name(variables["params"]["llm"]), name(state.params["llm"])
    base = {p: x for p, x in f_llm.items() if re.search(quant.BASE_WEIGHTS, p)}
    assert base and not set(base) & set(q_llm)  # not among the differentiated params
    stored = state.model_state[quant.BASE_COLLECTION]["llm"]
    codes = [x for p, x in name(stored).items() if p.endswith("codes")]
    assert len(codes) == len(base) and all(c.dtype == np.uint8 for c in codes)
    n = sum(x.size for x in base.values())
    held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(stored))
    assert abs(held / n - (0.5 + 4 / 32)) < 1e-6  # 0.5 byte per weight + a float32 per 32
    joined = quant.join_quantized(state.params["llm"], stored, "nf4", 32)
    assert isinstance(joined["blocks_0"]["attention"]["q"]["kernel"], quant.QTensor)
    # the other frozen LLM leaves are bfloat16; the adapters float32 and alone optimised
    assert q_llm["embedding"].dtype == np.dtype("bfloat16")
    assert all(x.dtype == np.float32 for p, x in q_llm.items() if "lora_" in p)
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    trained = sum(x.size for p, x in name(state.params).items() if x.dtype == np.float32)
    assert 0 < n_opt <= 2 * trained
