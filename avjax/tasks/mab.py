"""MAB task: lip reading and speech from silent video with the visual-audio memory.

Composes the AV data module (`avjax.data.video.av_data.AVData`, with `mel=True`: grey mouth
crops `video [B, T, S, S, 1]` uint8, log-mel `mel [B, 4T, 80]` at 100 Hz, word `label [B]`,
`length [B]`), the model (`avjax.models.mab.MAB`), the paper's loss
(`avjax.models.mab.mab_losses`) and the evaluation below.

Training feeds the real audio (train branch + memory losses); the held-out loss and
`--mode=eval` feed the video alone (the test-time branch). `evaluate` (the `task` evaluator)
writes under `<workdir>/eval/step_<N>/`: `report.json` (word accuracy of the test branch on
the held-out speakers; with the speech head STOI / ESTOI of the decoded held-out clips
against their real audio, and the mel L1), `addressing_words.png` (the source addressing of
the memory averaged per word class: rows words, columns slots) and
`addressing_<WORD>.png` (frames x slots) for the first `eval.heatmap_words` words.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avjax.data.video.av_data import AVData
from avjax.io import as_path
from avjax.models import mab as mab_lib
from avjax.nn import memory
from avjax.tasks.base import Batch, LossContext, Metrics, Task


def build_mab(mc: Any, num_classes: int) -> mab_lib.MAB:
    """`MAB` from `config.model` (`num_classes` from the data's vocabulary when
    `model.num_classes == 0` and `model.classify`)."""
    return mab_lib.MAB(
        num_classes=num_classes if mc.classify else 0,
        mel_bins=int(mc.mel_bins) if mc.speech else 0,
        stem_features=int(mc.stem_features),
        widths=tuple(mc.widths),
        blocks=tuple(mc.blocks),
        audio_channels=tuple(mc.audio_channels),
        backend=mc.backend,
        gru_hidden=int(mc.gru_hidden),
        gru_layers=int(mc.gru_layers),
        tcn_widths=tuple(mc.tcn_widths),
        use_memory=bool(mc.use_memory),
        num_slots=int(mc.num_slots),
        radius=float(mc.radius),
        memory_heads=int(mc.memory_heads),
        front_dropout=float(mc.front_dropout),
        fusion_dropout=float(mc.fusion_dropout),
        per_clip_norm=bool(mc.per_clip_norm),
        dtype=jnp.dtype(mc.dtype),
    )


class MABTask(Task):
    """Multi-modality Associative Bridging (`avjax.models.mab`) on an AV corpus."""

    name = "mab"
    rng_streams = ("dropout",)

    def __init__(self, config, workdir):
        if not config.data.mel:
            raise ValueError("config.data.mel must be True for MAB (the audio memory reads mel)")
        self.data = AVData.from_config(config, workdir)
        super().__init__(config, workdir)

    # --- model ------------------------------------------------------------------------------
    def num_classes(self) -> int:
        """`model.num_classes`, or (0) the size of the data's word vocabulary."""
        n = int(self.config.model.num_classes)
        if n:
            return n
        self.data.prepare()
        return max(len(self.data.vocabulary), 1)

    def build_model(self) -> nn.Module:
        return build_mab(self.config.model, self.num_classes())

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        mel = batch["mel"] if self.config.model.use_memory else None
        return {"video": batch["video"], "lengths": batch["length"], "mel": mel}

    def mel_target(self, batch: Batch) -> jax.Array:
        """The speech head's target: log-mel normalised by `model.mel_mean` / `mel_std`."""
        mc = self.config.model
        return (jnp.asarray(batch["mel"], jnp.float32) - float(mc.mel_mean)) / float(mc.mel_std)

    def apply_loss(
        self, model: nn.Module, params: Any, batch: Batch, ctx: LossContext
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        inputs = self.model_inputs(batch)
        if not ctx.train:
            inputs["mel"] = None  # evaluation: video only (the test-time branch)
        out, state = ctx.apply(model, params, **inputs, train=ctx.train)
        target = self.mel_target(batch) if self.config.model.speech else None
        terms = mab_lib.mab_losses(
            out, batch["label"], batch["length"], target, float(self.config.model.mel_weight)
        )
        b = batch["video"].shape[0]
        metrics = {"weight": jnp.asarray(b, jnp.float32)}
        for k, v in terms.items():
            metrics["accuracy" if k == "correct" else k] = v
        return terms["loss"], metrics, state

    def tokens_per_batch(self, batch: Batch) -> int:
        return int(np.sum(batch["length"]))

    def compatibility(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.config.model.to_dict(),
            **self.data.compatibility(),
        }

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        """Word accuracy, STOI / ESTOI (speech head) and addressing heat maps (module doc)."""
        return evaluate_heldout(self, model, params, step)


# --- evaluation -------------------------------------------------------------------------------


@functools.cache
def _predictor(model: nn.Module) -> Any:
    def predict(variables, video, lengths, mel, recall_from):
        if not model.use_memory:
            out = model.apply(variables, video, lengths, None, train=False)
            return {"logits": out.test.logits, "mel": out.test.mel}
        # With the real audio as well: the test branch does not read it (video only, as
        # without it), the train branch and the target addressing are the diagnostics.
        out = model.apply(variables, video, lengths, mel, train=False)
        res = {"logits": out.test.logits, "mel": out.test.mel}
        res["addr"] = out.bridge.source_addressing
        res["tgt_addr"] = out.bridge.target_addressing
        if out.train.logits is not None:  # the test branch fed another word's recall
            swapped = model.apply(variables, video, lengths, None, recall_from=recall_from)
            res["audio_logits"], res["swap_logits"] = out.train.logits, swapped.test.logits
        return res

    return jax.jit(predict)


def _other_word(labels: np.ndarray) -> np.ndarray:
    """`[B]` indices: for each clip the next clip of the batch (cyclically) with another label
    (itself when the batch has one label)."""
    b = len(labels)
    out = np.arange(b)
    for i in range(b):
        for k in range(1, b):
            if labels[(i + k) % b] != labels[i]:
                out[i] = (i + k) % b
                break
    return out


def _heldout_outputs(task: MABTask, model: nn.Module, params: Any) -> dict[str, Any]:
    """Predictions, test-branch mels and per-example addressings over the held-out batches
    (with the memory also the audio branch's and swapped-recall predictions, `tgt_addr`)."""
    predict = _predictor(model)
    variables = task.variables(params)
    keys = ("label", "length", "audio", "true_mel", "pred", "mel", "addr", "tgt_addr")
    rows: dict[str, list] = {k: [] for k in keys + ("audio_pred", "swap_pred")}
    for batch in task.eval_batches(jax.process_index(), jax.process_count()):
        res = predict(
            variables, batch["video"], batch["length"], batch["mel"], _other_word(batch["label"])
        )
        for k in ("label", "length", "audio"):
            rows[k].append(batch[k])
        for k, name in (("logits", "pred"), ("audio_logits", "audio_pred")):
            if res.get(k) is not None:
                rows[name].append(np.asarray(jnp.argmax(res[k], -1)))
        if res.get("swap_logits") is not None:
            rows["swap_pred"].append(np.asarray(jnp.argmax(res["swap_logits"], -1)))
        if res["mel"] is not None:
            rows["mel"].append(np.asarray(res["mel"]))
            rows["true_mel"].append(np.asarray(batch["mel"], np.float32))
        for k in ("addr", "tgt_addr"):
            if res.get(k) is not None:
                rows[k].append(np.asarray(res[k]))
    return {k: np.concatenate(v) if v else None for k, v in rows.items()}


def _entropy(p: np.ndarray) -> np.ndarray:
    """`memory.entropy` (nats over slots, `[..., slots] -> [...]`) as a numpy array."""
    return np.asarray(memory.entropy(jnp.asarray(p)))


def addressing_stats(addr: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> dict:
    """Is the memory used? `addr [N, T, slots]` (single head), `labels [N]`, `lengths [N]`.

    `entropy`: mean per-frame addressing entropy (nats; ln(slots) = uniform);
    `slot_perplexity`: exp(entropy of the mean addressing), the number of slots in use;
    `word_information`: I(word; slot) in nats with words equally likely, the entropy of the
    mean of the per-word mean addressings minus their mean entropy (0: every word addresses
    the same slots; ln(words) at most), each clip averaged over its valid frames.
    """
    frames = [addr[i][: int(lengths[i])] for i in range(len(addr))]
    per_clip = np.stack([f.mean(0) for f in frames])
    overall = per_clip.mean(0)
    words = sorted(set(int(x) for x in labels if x >= 0))
    per_word = np.stack([per_clip[labels == w].mean(0) for w in words])
    return {
        "entropy": float(np.mean(_entropy(np.concatenate(frames)))),
        "slot_perplexity": float(np.exp(_entropy(overall))),
        "word_information": float(_entropy(per_word.mean(0)) - np.mean(_entropy(per_word))),
    }


def _memory_report(rows: dict[str, Any]) -> dict[str, float]:
    """Addressing statistics of both memories and the accuracies that show what the
    classifier takes from the recalled audio (flat `memory_*` keys)."""
    labels, lengths = rows["label"], rows["length"]
    out: dict[str, float] = {}
    for name in ("addr", "tgt_addr"):
        if rows[name] is None or rows[name].ndim != 3:
            continue
        side = "source" if name == "addr" else "target"
        for k, v in addressing_stats(rows[name], labels, lengths).items():
            out[f"memory_{side}_{k}"] = v
    if rows["tgt_addr"] is not None and rows["addr"].ndim == 3:
        src, tgt = rows["addr"], rows["tgt_addr"]
        valid = np.arange(src.shape[1])[None, :] < lengths[:, None]
        # the bridge loss itself on the held-out clips (log-addressings are their logits)
        log_p = lambda a: jnp.log(jnp.maximum(jnp.asarray(a), 1e-30))  # noqa: E731
        out["memory_kl"] = float(memory.alignment_loss(log_p(src), log_p(tgt), valid))
        out["memory_top1_agreement"] = float((src.argmax(-1) == tgt.argmax(-1))[valid].mean())
    has = labels >= 0
    for key in ("audio_pred", "swap_pred"):
        if rows[key] is not None and has.any():
            name = "audio_branch_accuracy" if key == "audio_pred" else "swapped_recall_accuracy"
            out[name] = float(np.mean(rows[key][has] == labels[has]))
    return out


def _speech_scores(task: MABTask, rows: dict[str, Any], out_dir: Any) -> dict[str, float]:
    """STOI / ESTOI of held-out clips decoded from the predicted mel (Griffin-Lim vocoder),
    beside the trivial baseline `*_mean_mel`: the same vocoder on the held-out clips' mean
    log-mel spectrum (per bin, constant over time: no information from the video)."""
    from avjax.data import audio as audio_lib
    from avjax.data.speech import vocoder
    from avjax.eval import av_metrics

    mc, ec = task.config.model, task.config.eval
    n = min(int(ec.speech_clips), len(rows["mel"]))
    valid = [rows["true_mel"][i][: 4 * int(rows["length"][i])] for i in range(len(rows["mel"]))]
    mean_mel = np.concatenate(valid).mean(axis=0)  # [mels]
    scores: dict[str, list[float]] = {k: [] for k in ("stoi", "estoi", "mel_l1")}
    scores.update({"stoi_mean_mel": [], "estoi_mean_mel": [], "mel_l1_mean_mel": []})
    for i in range(n):
        log_mel = rows["mel"][i][: len(valid[i])] * float(mc.mel_std) + float(mc.mel_mean)
        for suffix, mel in (("", log_mel), ("_mean_mel", np.broadcast_to(mean_mel, log_mel.shape))):
            wav = vocoder.mel_to_wav(np.ascontiguousarray(mel), n_iter=int(ec.griffin_lim_iters))
            clean = rows["audio"][i][: len(wav)]
            scores["stoi" + suffix].append(av_metrics.stoi(clean, wav))
            scores["estoi" + suffix].append(av_metrics.estoi(clean, wav))
            scores["mel_l1" + suffix].append(float(np.mean(np.abs(mel - valid[i]))))
            if i == 0:
                audio_lib.write_wav(str(out_dir / f"speech_0{suffix}.wav"), wav, 16000)
    return {**{k: float(np.mean(v)) for k, v in scores.items()}, "speech_clips": n}


def _heatmaps(task: MABTask, rows: dict[str, Any], out_dir: Any) -> int:
    """Writes the addressing heat maps (PNG); returns the number of word classes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocab = task.data.vocabulary
    addr, labels, lengths = rows["addr"], rows["label"], rows["length"]
    words = sorted({int(x) for x in labels if x >= 0})
    if not words:
        return 0
    per_word = []
    for w in words:
        sel = [i for i in range(len(labels)) if labels[i] == w]
        per_word.append(np.mean([addr[i][: lengths[i]].mean(0) for i in sel], axis=0))
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.12 * len(words))))
    ax.imshow(np.stack(per_word), aspect="auto", cmap="viridis")
    ax.set_xlabel("memory slot")
    ax.set_ylabel("word")
    if len(words) <= 40:
        ax.set_yticks(range(len(words)), [vocab[w] for w in words], fontsize=6)
    fig.tight_layout()
    fig.savefig(str(out_dir / "addressing_words.png"), dpi=100)
    plt.close(fig)
    for w in words[: int(task.config.eval.heatmap_words)]:
        i = int(np.flatnonzero(labels == w)[0])
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.imshow(addr[i][: lengths[i]], aspect="auto", cmap="viridis")
        ax.set_title(f"{vocab[w]}: source addressing")
        ax.set_xlabel("memory slot")
        ax.set_ylabel("frame")
        fig.tight_layout()
        fig.savefig(str(out_dir / f"addressing_{vocab[w]}.png"), dpi=80)
        plt.close(fig)
    return len(words)


def evaluate_heldout(task: MABTask, model: nn.Module, params: Any, step: int) -> dict[str, Any]:
    """Held-out evaluation from video only; writes report.json and the heat maps."""
    from avjax.eval import av_metrics

    rows = _heldout_outputs(task, model, params)
    out_dir = as_path(task.workdir) / "eval" / f"step_{step}"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"clips": int(len(rows["label"]))}
    labelled = rows["label"] >= 0
    if rows["pred"] is not None and labelled.any():
        summary["word_accuracy"] = av_metrics.word_accuracy(
            list(rows["pred"][labelled]), list(rows["label"][labelled])
        )
        summary["chance"] = 1.0 / max(len(task.data.vocabulary), 1)
    if rows["mel"] is not None:
        summary.update(_speech_scores(task, rows, out_dir))
    if rows["addr"] is not None:
        summary["heatmap_words"] = _heatmaps(task, rows, out_dir)
        summary.update(_memory_report(rows))
    summary["use_memory"] = bool(task.config.model.use_memory)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
