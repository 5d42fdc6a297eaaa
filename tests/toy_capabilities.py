"""Toy tasks for the train loop's capabilities beyond one model and one optimizer.

`CapabilityToyTask`: the toy LM data with a model that uses BatchNorm (`batch_stats`), a
`train` flag, dropout and input noise (two named RNG streams), a frozen `encoder` and a
`lora_` adapter (parameter groups), trained with EMA. `GanToyTask`: a generator (the toy LM)
and a discriminator on its output distributions, two named parts with their own optimizers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from toy_task import ToyLM, ToyTask, toy_config


def _dense(features: int, axes: tuple, name: str | None = None) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
    return nn.Dense(features, kernel_init=init, name=name)


class CapabilityLM(nn.Module):
    """Embedding (+ noise in training) -> frozen `encoder` Dense -> BatchNorm -> gelu ->
    dropout -> `lora_up` Dense (residual) -> tied logits `[batch, length, vocab]`."""

    vocab: int = 32
    width: int = 16

    @nn.compact
    def __call__(self, tokens, segment_pos, train: bool = False):
        emb = self.param(
            "embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.5), ("vocab", "embed")),
            (self.vocab, self.width),
        )
        x = emb[tokens]  # [batch, length, embed]
        if train:
            x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
        h = _dense(4 * self.width, ("embed", "mlp"), "encoder")(x)
        h = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.8,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )(h)
        h = nn.Dropout(0.3, deterministic=not train)(nn.gelu(h))
        x = x + _dense(self.width, ("mlp", "embed"), "lora_up")(h)
        return x @ emb.T


class CapabilityToyTask(ToyTask):
    name = "toy_capabilities"
    rng_streams = ("dropout", "noise")

    def build_model(self):
        return CapabilityLM()

    def apply_loss(self, model, params, batch, ctx):
        logits, model_state = ctx.apply(model, params, **self.model_inputs(batch), train=ctx.train)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(xent * batch["mask"]), {"weight": jnp.sum(batch["mask"])}, model_state


class SamplingCapabilityToyTask(CapabilityToyTask):
    """`sample` reports what `avjax.main` handed it: the checkpoint's batch statistics."""

    def sample(self, model, params, step):
        variables = self.variables(params)
        tokens = jnp.zeros((1, 4), jnp.int32)
        logits = model.apply(variables, tokens, jnp.arange(4)[None], train=False)
        return {"collections": sorted(variables), "finite": bool(jnp.isfinite(logits).all())}


def capability_config(**train):
    """Toy config with EMA, a frozen encoder and a `lora_` group at twice the learning rate."""
    groups = [{"regex": "^encoder/", "optimizer": "frozen"}, {"regex": "^lora_", "lr_mult": 2.0}]
    return toy_config(ema_decay=0.9, eval_with_ema=True, param_groups=groups, **train)


class Discriminator(nn.Module):
    """Scores each position's token distribution `[batch, length, vocab]` -> `[batch, length]`."""

    @nn.compact
    def __call__(self, probs):
        h = nn.gelu(_dense(16, ("vocab", "mlp"))(probs))
        return _dense(1, ("mlp", None))(h)[..., 0]


class ToyGAN(nn.Module):
    """`generator` (the toy LM) and `discriminator`: the param tree's two top-level parts."""

    def setup(self):
        self.generator = ToyLM()
        self.discriminator = Discriminator()

    def __call__(self, tokens, segment_pos):
        logits = self.generate(tokens, segment_pos)
        return logits, self.discriminate(jax.nn.softmax(logits))

    def generate(self, tokens, segment_pos):
        return self.generator(tokens, segment_pos)[0]

    def discriminate(self, probs):
        return self.discriminator(probs)


class GanToyTask(ToyTask):
    name = "toy_gan"
    parts = ("discriminator", "generator")

    def build_model(self):
        return ToyGAN()

    def apply_loss(self, model, params, batch, ctx):
        mask = batch["mask"]
        variables = {"params": params}
        logits = model.apply(variables, **self.model_inputs(batch), method="generate")
        if ctx.part == "discriminator":
            fake = jax.nn.softmax(jax.lax.stop_gradient(logits))
            real = jax.nn.one_hot(batch["targets"], logits.shape[-1])
            d_fake = model.apply(variables, fake, method="discriminate")
            d_real = model.apply(variables, real, method="discriminate")
            loss = jax.nn.softplus(d_fake) + jax.nn.softplus(-d_real)
        else:  # the generator's step, and eval
            xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            d_fake = model.apply(variables, jax.nn.softmax(logits), method="discriminate")
            loss = xent + 0.1 * jax.nn.softplus(-d_fake)
        return jnp.sum(loss * mask), {"weight": jnp.sum(mask)}, dict(ctx.model_state)


def gan_config(**train):
    """Toy config with the discriminator on its own learning rate and b1."""
    return toy_config(parts={"discriminator": {"lr": 5e-3, "b1": 0.5}}, **train)
