"""Resumable, sharded long-form sampling: a killed job continues where it stopped.

`generate_resumable` runs `avjax.sample.autoregressive`'s prefill and decode loop
(`decode_chunks`) and saves, every `save_every_chunks` chunks (and at the end), the sampler
state with orbax to `directory`:

  state:  the `SamplerState` (model caches, next-token logits, positions, step)
  tokens: `[batch, num_tokens]` int32, the tokens generated so far (zeros beyond `step`)
  key:    the sampling key's raw data (token i is drawn with `fold_in(key, i)`)
  meta:   JSON: what the job is (`job_spec`: prompt digest, num_tokens, seed, temperature,
          top-k/p, chunk_tokens, batch, a digest of the parameters' values, and what the
          caller adds, e.g. the checkpoint step); a restart with other arguments in the same
          directory is refused, naming the fields that differ

Restarted with the same arguments, it restores the newest saved step and regenerates from
there (a save cut short by a kill leaves a temporary folder, removed on restart). Chunks
always end at multiples of `chunk_tokens`, so the resumed job runs the same
compiled programs on the same (bit-identical, restored) states as an uninterrupted one: the
tokens are exactly equal.

With a `mesh`, the prompt (and so every `[batch, ...]` leaf of the state) is sharded over the
mesh axes the logical `batch` axis maps to (`rules`; default `data`), and parameters keep
their shardings: batch sampling on a pod. Progress (tokens/s, ETA) goes to a tqdm bar.

One directory holds one job. Callers that sample several requests from one model (other
lengths, temperatures, seeds) give each its own directory, named by `job_key(spec)`: the
same request finds its job again (resumed, or returned when finished), another one starts
fresh beside it. `claim_job` records the spec as `job.json` in a folder a user named and
refuses a different request there. Directories may be URLs (`gs://...`; `avjax.io.as_path`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from avjax.io import PathLike, as_path, write_text_atomic
from avjax.sample import autoregressive
from avjax.sample.autoregressive import SamplerState, prefill


class ResumeMismatchError(ValueError):
    """The directory holds a sampling job with different arguments."""


def params_digest(params: Any) -> str:
    """sha256 (hex) of a parameter tree's values, names, shapes and dtypes.

    Leaves are brought to the host one at a time (`process_allgather` across processes), so
    it is independent of how they are sharded, and the host holds one leaf at a time. Cost:
    ~10 ms for SpeechSSM's default 1.2M parameters on CPU; about 1 s per GB of parameters
    (sha256 speed), once per sampling call.
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = _gather(leaf) if isinstance(leaf, jax.Array) else np.asarray(leaf)
        x = np.ascontiguousarray(x)
        h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype};".encode())
        h.update(x.view(np.uint8).reshape(-1) if x.size else b"")
    return h.hexdigest()


def job_spec(
    prompt: np.ndarray,
    num_tokens: int,
    *,
    params_sha256: str,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_tokens: int = 250,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that defines a sampling job's tokens, as JSON-able values.

    Args:
      prompt: `[batch, prompt_len]` int32.
      params_sha256: `params_digest(params)`.
      extra: more fields the caller keys its jobs by (e.g. `{"checkpoint_step": 400}`).
    """
    prompt = np.ascontiguousarray(prompt, np.int32)
    return {
        "prompt_sha256": hashlib.sha256(prompt).hexdigest(),
        "batch": int(prompt.shape[0]),
        "prompt_len": int(prompt.shape[1]),
        "num_tokens": int(num_tokens),
        "seed": int(seed),
        "temperature": float(temperature),
        "top_k": int(top_k),
        "top_p": float(top_p),
        "chunk_tokens": int(chunk_tokens),
        "params_sha256": str(params_sha256),
        **(extra or {}),
    }


def job_key(spec: dict[str, Any]) -> str:
    """A stable hex key of a `job_spec` (sha256 of its sorted JSON)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def spec_diff(saved: dict[str, Any], requested: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{field: (saved, requested)}` for the fields where two specs differ."""
    return {
        k: (saved.get(k), requested.get(k))
        for k in sorted(set(saved) | set(requested))
        if saved.get(k) != requested.get(k)
    }


def claim_job(directory: PathLike, spec: dict[str, Any], *, write: bool = True) -> bool:
    """Makes `directory` the home of the job `spec`: records it as `job.json`, or checks it.

    Returns True when `directory` already held this job. With `write=False` (processes
    other than 0) nothing is written.

    Raises:
      ResumeMismatchError: `directory` holds another job (the message names the fields).
    """
    path = as_path(directory) / "job.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diff = spec_diff(saved, spec)
        if diff:
            fields = "; ".join(f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in diff.items())
            raise ResumeMismatchError(
                f"{as_path(directory)} holds another sampling job ({fields}); give this request "
                "another folder, or repeat the saved request to resume it"
            )
        return True
    if write:
        write_text_atomic(path, json.dumps(spec, indent=1, sort_keys=True))
    return False


def _manager(directory: PathLike, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        as_path(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            create=True,
            # A job killed mid-save leaves a temporary folder: removed on restart.
            cleanup_tmp_directories=True,
        ),
    )


def _gather(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as host numpy."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate_resumable(
    model: nn.Module,
    params: Any,
    prompt: np.ndarray,
    num_tokens: int,
    directory: PathLike,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_tokens: int = 250,
    save_every_chunks: int = 6,
    keep: int = 2,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    stop_after_chunks: int | None = None,
    progress: bool = True,
    params_sha256: str | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Iterator[np.ndarray]:
    """Yields the generated tokens `[batch, n]` (host numpy) chunk by chunk, resuming.

    After a restore, the first item holds every token generated before the stop (so a consumer
    always sees the whole continuation); each later item is one decoded chunk.

    Args:
      model, params: any LM with GriffinLM's calling convention (`avjax.sample.autoregressive`).
      prompt: `[batch, prompt_len]` int32.
      num_tokens: tokens to generate after the prompt.
      directory: where the sampler state is saved (created; one job per directory; a path or
        a URL such as `gs://bucket/run/...`).
      seed, temperature, top_k, top_p: sampling (`autoregressive.sample_from_logits`).
      chunk_tokens: decode steps per jitted `lax.scan` chunk.
      save_every_chunks: save the state every this many chunks, counted from the start of
        the job (and after the last one).
      keep: saved steps to keep.
      mesh: shard the batch over it (the axes `rules` give logical `batch`; default `data`);
        a batch that does not divide that many ways is not sharded (a warning says so).
      rules: logical axis rules for the model's sharding constraints under `mesh`.
      stop_after_chunks: stop (without an extra save) after decoding this many chunks in this
        call, as a killed job would; for tests.
      progress: show a tqdm bar with tokens/s and ETA.
      params_sha256: `params_digest(params)` when the caller has it already (computed here
        otherwise).
      extra_meta: more fields of the job's spec (`job_spec(extra=...)`).

    Raises:
      ResumeMismatchError: `directory` holds a job with other arguments.
    """
    prompt = np.asarray(prompt, np.int32)
    batch = prompt.shape[0]
    meta = job_spec(
        prompt,
        num_tokens,
        params_sha256=params_sha256 or params_digest(params),
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        chunk_tokens=chunk_tokens,
        extra=extra_meta,
    )
    manager = _manager(directory, keep)
    rules = [(str(k), tuple(v) if isinstance(v, list) else v) for k, v in (rules or [])] or [
        ("batch", "data")
    ]
    mesh, prompt_sharding = _batch_sharding(mesh, rules, batch)
    ctx = _MeshContext(mesh, rules)
    try:
        with ctx:
            yield from _run(
                model,
                params,
                prompt,
                prompt_sharding,
                manager,
                meta,
                save_every_chunks=save_every_chunks,
                stop_after_chunks=stop_after_chunks,
                progress=progress,
            )
    finally:
        manager.close()


def _batch_sharding(
    mesh: jax.sharding.Mesh | None, rules: Sequence[tuple[str, Any]], batch: int
) -> tuple[jax.sharding.Mesh | None, jax.sharding.Sharding | None]:
    """`(mesh, prompt sharding)`: the batch over the mesh axes `rules` give logical `batch`,
    or `(None, None)` without a mesh or when `batch` does not divide that many ways."""
    if mesh is None:
        return None, None
    spec = nn.logical_to_mesh_axes(("batch", None), rules)
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if batch % ways:
        logging.warning(
            "sampling batch %d does not divide the %d-way batch sharding %s: not sharded",
            batch,
            ways,
            spec,
        )
        return None, None
    return mesh, jax.sharding.NamedSharding(mesh, spec)


class _MeshContext:
    """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)`, or nothing without a mesh."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self._stack: list[Any] = []

    def __enter__(self):
        if self.mesh is not None:
            for cm in (jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)):
                cm.__enter__()
                self._stack.append(cm)
        return self

    def __exit__(self, *exc):
        while self._stack:
            self._stack.pop().__exit__(*exc)


def _run(
    model: nn.Module,
    params: Any,
    prompt: np.ndarray,
    prompt_sharding: jax.sharding.Sharding | None,
    manager: ocp.CheckpointManager,
    meta: dict[str, Any],
    *,
    save_every_chunks: int,
    stop_after_chunks: int | None,
    progress: bool,
) -> Iterator[np.ndarray]:
    """The job `meta` describes (its sampling settings are read from it): restore, then
    `autoregressive.decode_chunks` with a save every `save_every_chunks` chunks."""
    from tqdm import tqdm

    if prompt_sharding is not None:
        prompt_arr = jax.device_put(prompt, prompt_sharding)
    else:
        prompt_arr = jnp.asarray(prompt)
    # The prefill also gives the state's structure and shardings, the target of a restore.
    state = jax.jit(functools.partial(prefill, model))(params, prompt_arr)
    num_tokens, chunk_tokens = meta["num_tokens"], meta["chunk_tokens"]
    key = jax.random.key(meta["seed"])
    tokens = np.zeros((meta["batch"], num_tokens), np.int32)
    done = 0
    if manager.latest_step() is not None:
        state, tokens, key, done = _restore(manager, meta, state, tokens, key)
        if done:
            yield tokens[:, :done].copy()

    chunks = autoregressive.decode_chunks(
        model,
        params,
        state,
        key,
        num_tokens,
        start=done,
        chunk_tokens=chunk_tokens,
        temperature=meta["temperature"],
        top_k=meta["top_k"],
        top_p=meta["top_p"],
    )
    if stop_after_chunks is not None:  # as a job killed after that many chunks
        chunks = itertools.islice(chunks, stop_after_chunks)
    with tqdm(
        total=num_tokens,
        initial=done,
        unit="tok",
        desc="sampling",
        mininterval=2.0,
        disable=not progress or jax.process_index() != 0,
    ) as bar:
        for state, new in chunks:
            new = _gather(new)
            n = new.shape[1]
            tokens[:, done : done + n] = new
            done += n
            bar.update(n)
            if done == num_tokens or done % (chunk_tokens * max(1, save_every_chunks)) == 0:
                _save(manager, done, meta, state, tokens, key)
            yield new


def _restore(
    manager: ocp.CheckpointManager,
    meta: dict[str, Any],
    state: SamplerState,
    tokens: np.ndarray,
    key: jax.Array,
) -> tuple[SamplerState, np.ndarray, jax.Array, int]:
    """`(state, tokens [batch, num_tokens], key, tokens done)` of the latest save of the job
    `meta`, restored into `state`'s shapes and shardings; another job's save is refused."""
    latest = manager.latest_step()
    saved = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    if saved["meta"] != meta:
        diff = spec_diff(saved["meta"], meta)
        raise ResumeMismatchError(
            f"{manager.directory} holds a sampling job with other arguments "
            f"(saved, requested): {diff}; use another directory or the same arguments"
        )
    target = {
        "state": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        ),
        "tokens": tokens,
        "key": np.asarray(jax.random.key_data(key)),
    }
    restored = manager.restore(
        latest, args=ocp.args.Composite(data=ocp.args.StandardRestore(target))
    )["data"]
    state = SamplerState(*restored["state"])
    done = int(latest)
    logging.info(
        "Resuming sampling at token %d of %d from %s", done, meta["num_tokens"], manager.directory
    )
    if done and done != int(state.step):
        raise ValueError(f"checkpoint {latest} holds step {int(state.step)}")
    key = jax.random.wrap_key_data(jnp.asarray(restored["key"]))
    return state, np.asarray(restored["tokens"], np.int32), key, done


def _save(
    manager: ocp.CheckpointManager,
    step: int,
    meta: dict[str, Any],
    state: SamplerState,
    tokens: np.ndarray,
    key: jax.Array,
) -> None:
    """Saves the sampler state, the tokens so far and the key at `step` (synchronously)."""
    data = {"state": state, "tokens": tokens, "key": np.asarray(jax.random.key_data(key))}
    manager.save(
        step,
        args=ocp.args.Composite(data=ocp.args.StandardSave(data), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()


def sample_resumable(*args: Any, **kwargs: Any) -> np.ndarray:
    """`generate_resumable` collected: the tokens `[batch, <= num_tokens]` generated so far."""
    chunks = list(generate_resumable(*args, **kwargs))
    if not chunks:
        prompt = np.asarray(args[2] if len(args) > 2 else kwargs["prompt"])
        return np.zeros((prompt.shape[0], 0), np.int32)
    return np.concatenate(chunks, axis=1)
