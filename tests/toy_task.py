"""A tiny next-token task on random token documents, for testing the generic train loop."""

from __future__ import annotations

import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avjax.data.speech import lm_windows
from avjax.tasks.base import Task
from avjax.train.sharding import DEFAULT_RULES


class ToyLM(nn.Module):
    """Embedding -> causal mixing of the previous token -> gated MLP -> logits."""

    vocab: int = 32
    width: int = 16

    @nn.compact
    def __call__(self, tokens, segment_pos):
        emb = self.param(
            "embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.5), ("vocab", "embed")),
            (self.vocab, self.width),
        )
        x = emb[tokens]
        prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        x = x + nn.Dense(
            self.width,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
        )(prev)
        h = nn.gelu(
            nn.Dense(
                4 * self.width,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("embed", "mlp")
                ),
            )(x)
        )
        x = x + nn.Dense(
            self.width,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "embed")
            ),
        )(h)
        return x @ emb.T, None


class ToyTask(Task):
    name = "toy"

    def prepare(self):
        rng = np.random.default_rng(0)
        # Documents with structure: token t+1 = (token t * 3 + 1) % vocab with some noise.
        docs = []
        for _ in range(8):
            x = [int(rng.integers(32))]
            for _ in range(200):
                x.append((x[-1] * 3 + 1) % 32 if rng.random() < 0.8 else int(rng.integers(32)))
            docs.append(np.array(x, np.int32))
        self._docs = docs
        return {"docs": len(docs)}

    def train_dataset(self, process_index, process_count):
        self.prepare()
        c = self.config
        return lm_windows.train_windows(
            self._docs[:6],
            c.data.seq_len,
            c.train.batch_size // process_count,
            c.seed,
            process_index,
            process_count,
        )

    def eval_batches(self, process_index, process_count):
        self.prepare()
        c = self.config
        return lm_windows.eval_windows(
            self._docs[6:],
            c.data.seq_len,
            c.train.batch_size // process_count,
            int(c.train.eval_batches),
            process_index,
            process_count,
        )

    def dummy_batch(self):
        shape = (self.config.train.batch_size, self.config.data.seq_len)
        return {
            "inputs": np.zeros(shape, np.int32),
            "targets": np.zeros(shape, np.int32),
            "segment_pos": np.zeros(shape, np.int32),
            "mask": np.ones(shape, np.float32),
        }

    def build_model(self):
        return ToyLM()

    def model_inputs(self, batch):
        return {"tokens": batch["inputs"], "segment_pos": batch["segment_pos"]}

    def loss(self, model, params, batch, rng):
        logits, _ = model.apply({"params": params}, **self.model_inputs(batch))
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(xent * batch["mask"]), {"weight": jnp.sum(batch["mask"])}


class HookedToyTask(ToyTask):
    """The toy task with a hook on each training batch this process draws (1-based count):
    `sigterm_at` sends SIGTERM to this process (if `sigterm_process` is None or this one),
    `nan_from` makes every later batch's mask NaN (so loss and state turn NaN),
    `batch_sleep` slows every batch (seconds), so a preemption notice has time to spread."""

    sigterm_at: int | None = None
    sigterm_process: int | None = None
    nan_from: int | None = None
    batch_sleep: float = 0.0

    def train_dataset(self, process_index, process_count):
        count = [0]

        def hook(batch):
            count[0] += 1
            time.sleep(self.batch_sleep)
            mine = self.sigterm_process in (None, process_index)
            if count[0] == self.sigterm_at and mine:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.nan_from is not None and count[0] >= self.nan_from:
                batch = dict(batch, mask=np.full_like(batch["mask"], np.nan))
            return batch

        return super().train_dataset(process_index, process_count).map(hook)


class GriffinToyTask(ToyTask):
    """The toy task on a tiny Griffin: (recurrent, recurrent, attention) x 2, width 32."""

    def build_model(self):
        from avjax.nn.griffin import GriffinLM

        m = self.config.model
        return GriffinLM(
            vocab_size=32,
            width=32,
            mlp_width=48,
            num_heads=2,
            num_layers=6,
            window=4,
            remat=m.get("remat", "none"),
            scan_layers=m.get("scan_layers", False),
        )


def toy_config(**train) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "toy"
    c.seed = 0
    c.data = ml_collections.ConfigDict({"seq_len": 16})
    c.model = ml_collections.ConfigDict({"width": 16})
    c.train = ml_collections.ConfigDict(
        dict(
            steps=8,
            batch_size=8,
            grad_accum=1,
            lr=1e-2,
            final_lr_frac=0.1,
            warmup_steps=2,
            weight_decay=0.1,
            b1=0.9,
            b2=0.98,
            clip_norm=1.0,
            log_every=2,
            eval_every=4,
            eval_batches=2,
            checkpoint_every=4,
            keep_checkpoints=3,
            async_checkpoints=True,
            reset_data_iterator=False,
        )
    )
    c.train.update(train)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = DEFAULT_RULES
    return c


def single_device_mesh():
    from avjax.train.sharding import make_mesh

    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
