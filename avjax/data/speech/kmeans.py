"""Mini-batch k-means in JAX, data-parallel over a device mesh.

For unit discovery on more frames than fit a full-batch Lloyd step (`units.kmeans`): k-means++
seeding on a random subset (`units._kmeans_pp`), then mini-batch updates (Sculley 2010): each
centroid is the running mean of every point ever assigned to it,

    counts += batch_counts;  c += (batch_sums - batch_counts * c) / counts,

so its step size decays as 1 / (points it has seen). Every batch is split over all devices of
the mesh (`jax.shard_map`): each device assigns its shard with `units._assign` and forms the
per-centroid sums and counts, which are summed over devices (`psum`); the update is then the
same on every device. A padded tail batch carries zero weights. A centroid that has not been
assigned a single point yet is moved onto the point of the batch farthest from its centroid.

Deterministic for a given seed; the sharded fit equals the one-device fit up to float32
summation order.

Streaming: the points are a `VectorSource` (an in-memory array, or `NpyShards`: `.npy` files
written by the feature pass, memory-mapped). Each epoch visits the source in a seeded random
order of contiguous blocks of `block_rows`; `buffer_rows` of them are read at a time, shuffled,
and cut into batches (the remainder carried to the next buffer), so at most `buffer_rows`
points (plus the k-means++ subset) are in memory whatever the corpus size. An array and the
same vectors on disk give the same batches, hence the same centroids.

Enough points: a centroid fitted on m points has a sampling error of sigma / sqrt(m) of its
cluster's spread sigma, and a unit seen m times in the fit has a usage estimate no better than
1 / sqrt(m) relative. Below ~30 points per centroid both are worse than ~18 %, many units
split noise rather than sound, and mini-batch updates (step 1 / count) never settle.
`check_enough_vectors` refuses such fits (`MIN_VECTORS_PER_UNIT` = 30); GSLM / HuBERT fit
100-500 units on ~100 h (1e4-1e5 points per unit), so 30 is a floor, not a target.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from avjax.data.speech.units import _assign, _kmeans_pp

MIN_VECTORS_PER_UNIT = 30


def check_enough_vectors(
    num_vectors: int,
    num_units: int,
    *,
    minimum: int = MIN_VECTORS_PER_UNIT,
    rate: float = 25.0,
    audio_minutes: float | None = None,
) -> None:
    """Raises ValueError when `num_vectors` are fewer than `minimum` per unit of `num_units`.

    The message names the fix in config terms (`data.fit_minutes`, `data.num_units`,
    `data.min_vectors_per_unit`); `rate` (vectors per second of audio) turns the minimum into
    minutes of audio. `minimum <= 0` disables the check.
    """
    need = minimum * num_units
    if minimum <= 0 or num_vectors >= need:
        return
    minutes = need / rate / 60
    got = f" from {audio_minutes:.1f} min of audio" if audio_minutes is not None else ""
    raise ValueError(
        f"k-means: {num_vectors} vectors{got} for data.num_units={num_units} is "
        f"{num_vectors / num_units:.1f} per unit; fitting needs >= {minimum} per unit "
        f"(data.min_vectors_per_unit), i.e. >= {need} vectors = {minutes:.0f} min of audio at "
        f"{rate:g} vectors/s. Raise data.fit_minutes to >= {math.ceil(minutes)} (the corpus "
        f"must hold that much train audio) or lower data.num_units to <= "
        f"{max(num_vectors // minimum, 1)}."
    )


class VectorSource(Protocol):
    """Points `[n, dim]` read by row ranges (an array in memory or shards on disk)."""

    dim: int

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` as float32 `[stop - start, dim]`."""
        ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The sorted row indices `rows` as float32 `[len(rows), dim]`."""
        ...


class ArraySource:
    """An array `[n, dim]` (in memory, or one memory-mapped `.npy`) as a `VectorSource`."""

    def __init__(self, x: np.ndarray):
        if x.ndim != 2:
            raise ValueError(f"points must be [n, dim], got shape {x.shape}")
        self.x, self.dim = x, int(x.shape[1])

    def __len__(self) -> int:
        return len(self.x)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.x[start:stop], np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[rows], np.float32)


class NpyShards:
    """`.npy` files of `[n_i, dim]` points, memory-mapped and read as one `[sum n_i, dim]`."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [os.fspath(p) for p in paths]
        self.arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        if not self.arrays or any(a.ndim != 2 for a in self.arrays):
            raise ValueError(f"NpyShards needs [n, dim] .npy files, got {self.paths[:3]}")
        dims = {int(a.shape[1]) for a in self.arrays}
        if len(dims) != 1:
            raise ValueError(f"NpyShards: shards disagree on dim: {sorted(dims)}")
        self.dim = dims.pop()
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(stop - start, 0), self.dim), np.float32)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.arrays)):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo >= hi:
                break
            out[lo - start : hi - start] = self.arrays[i][
                lo - self.offsets[i] : hi - self.offsets[i]
            ]
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.dim), np.float32)
        for i in np.unique(shard):
            sel = shard == i
            out[sel] = self.arrays[i][rows[sel] - self.offsets[i]]
        return out


class ShardWriter:
    """Writes points `[n, dim]` appended in pieces as `.npy` shards of about `shard_rows`
    under `directory` (the feature pass); `paths` lists what was written."""

    def __init__(self, directory: str | os.PathLike, shard_rows: int = 262_144):
        self.directory, self.shard_rows = os.fspath(directory), int(shard_rows)
        os.makedirs(self.directory, exist_ok=True)
        self.paths: list[str] = []
        self.rows = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def append(self, x: np.ndarray) -> None:
        """Adds `x [m, dim]`; a shard is written once `shard_rows` are pending."""
        if len(x):
            self._pending.append(np.asarray(x, np.float32))
            self._pending_rows += len(x)
            self.rows += len(x)
        if self._pending_rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Writes what is pending as one shard."""
        if not self._pending:
            return
        path = os.path.join(self.directory, f"shard-{len(self.paths):05d}.npy")
        np.save(path, np.concatenate(self._pending))
        self.paths.append(path)
        self._pending, self._pending_rows = [], 0

    def close(self) -> NpyShards:
        """Flushes and returns the shards as a source."""
        self.flush()
        return NpyShards(self.paths)


def source_stats(
    source: VectorSource, normalize: bool = True, chunk_rows: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension `(mean, std)` `[dim]` float32 of a source, read in chunks (float64 sums;
    std floored at 1e-3 as `units.feature_stats`); `(0, 1)` when not `normalize`."""
    if not normalize:
        return np.zeros(source.dim, np.float32), np.ones(source.dim, np.float32)
    n = len(source)
    s1, s2 = np.zeros(source.dim), np.zeros(source.dim)
    for a in range(0, n, chunk_rows):
        x = source.read(a, min(a + chunk_rows, n)).astype(np.float64)
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def _epoch_batches(
    source: VectorSource,
    rng: np.random.Generator,
    batch_size: int,
    block_rows: int,
    buffer_rows: int,
) -> Iterator[np.ndarray]:
    """One epoch of batches (`[<= batch_size, dim]`; only the last may be short): blocks of
    `block_rows` in a seeded random order, read `buffer_rows` at a time and shuffled."""
    n = len(source)
    starts = rng.permutation(np.arange(0, n, block_rows))
    per_buffer = max(1, buffer_rows // block_rows)
    carry = np.zeros((0, source.dim), np.float32)
    for g in range(0, len(starts), per_buffer):
        parts = [carry] + [
            source.read(int(a), min(int(a) + block_rows, n)) for a in starts[g : g + per_buffer]
        ]
        buf = np.concatenate(parts)
        buf = buf[rng.permutation(len(buf))]
        full = len(buf) // batch_size * batch_size
        for a in range(0, full, batch_size):
            yield buf[a : a + batch_size]
        carry = buf[full:]
    if len(carry):
        yield carry


@dataclasses.dataclass
class KMeansResult:
    """centroids `[k, dim]` float32; counts `[k]` points each centroid absorbed; inertia per
    step (weighted mean squared distance of the batch to the centroids before the update); steps
    run; wall seconds; the batch size used (rounded to the mesh)."""

    centroids: np.ndarray
    counts: np.ndarray
    inertia: list[float]
    steps: int
    seconds: float
    batch_size: int


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh `("data",)` over `devices` (default: all)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


@functools.cache
def _step_fn(mesh: Mesh):
    """The jitted update for `mesh`: (c, counts, x, w) -> (c, counts, inertia)."""
    axes = tuple(mesh.axis_names)

    def local(c, counts, x, w):
        k = c.shape[0]
        a, d = _assign(x, c)
        sums = jax.lax.psum(jax.ops.segment_sum(x * w[:, None], a, num_segments=k), axes)
        bc = jax.lax.psum(jax.ops.segment_sum(w, a, num_segments=k), axes)
        inertia = jax.lax.psum(jnp.sum(w * d), axes) / jnp.maximum(
            jax.lax.psum(jnp.sum(w), axes), 1
        )
        new_counts = counts + bc
        step = jnp.where(bc > 0, 1.0 / jnp.maximum(new_counts, 1.0), 0.0)
        new_c = c + (sums - bc[:, None] * c) * step[:, None]
        return new_c, new_counts, inertia

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(axes), P(axes)),
        out_specs=(P(), P(), P()),
    )
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(axes))
    return jax.jit(
        sharded,
        in_shardings=(rep, rep, data, data),
        out_shardings=(rep, rep, rep),
        donate_argnums=(0, 1),
    )


def mean_sq_distance(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared distance of `x [n, dim]` to its nearest centroid (full-data inertia)."""
    _, d = _assign(jnp.asarray(x, jnp.float32), jnp.asarray(centroids, jnp.float32))
    return float(jnp.mean(d))


def _reseed_empty(
    c: np.ndarray, counts: np.ndarray, x: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, int]:
    """Moves never-assigned centroids onto the batch points farthest from their centroid."""
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return c, 0
    _, d = _assign(jnp.asarray(x), jnp.asarray(c))
    d = np.where(w > 0, np.asarray(d), -1.0)
    far = np.argsort(-d, kind="stable")[: len(empty)]
    c = c.copy()
    c[empty[: len(far)]] = x[far]
    return c, len(far)


def _as_source(x: np.ndarray | VectorSource) -> VectorSource:
    return ArraySource(np.asarray(x, np.float32)) if isinstance(x, np.ndarray | list) else x


@dataclasses.dataclass
class _Stopper:
    """Early stop on the smoothed (exponentially weighted) batch inertia."""

    alpha: float
    patience: int | None
    ewa: float | None = None
    best: float = math.inf
    since_best: int = 0

    def done(self, inertia: float) -> bool:
        a = self.alpha
        self.ewa = inertia if self.ewa is None else (1 - a) * self.ewa + a * inertia
        if self.ewa < self.best * (1 - 1e-4):
            self.best, self.since_best = self.ewa, 0
            return False
        self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience


def _batches(
    source: VectorSource,
    rng: np.random.Generator,
    batch_size: int,
    block_rows: int,
    buffer_rows: int,
    steps: int,
) -> Iterator[np.ndarray]:
    """`steps` batches over as many epochs as it takes."""
    done = 0
    while done < steps:
        for b in _epoch_batches(source, rng, batch_size, block_rows, buffer_rows):
            yield b
            done += 1
            if done == steps:
                return


def fit_minibatch_kmeans(
    x: np.ndarray | VectorSource,
    num_clusters: int,
    *,
    batch_size: int = 8192,
    epochs: float = 10.0,
    max_steps: int | None = None,
    max_no_improvement: int | None = 20,
    init_size: int | None = None,
    seed: int = 0,
    mesh: Mesh | None = None,
    progress: bool = False,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    block_rows: int = 8192,
    buffer_rows: int = 131_072,
    min_per_unit: int = 0,
) -> KMeansResult:
    """Mini-batch k-means on points `x [n, dim]` with batches split over `mesh` (default: all
    devices); `x` is an array or a `VectorSource` (e.g. `NpyShards` on disk, streamed).

    Args:
      x: points, float32 (an array is wrapped in `ArraySource`).
      num_clusters: k.
      batch_size: points per step (rounded up to a multiple of the mesh size).
      epochs: passes over `x`; `max_steps` caps the step count.
      max_no_improvement: stop when the smoothed batch inertia has not improved for this many
        steps (None: run every step).
      init_size: points used for k-means++ seeding (default `max(3 k, batch_size)`, <= n).
      seed: seeds the seeding and the batch order.
      mesh: the device mesh; every axis is treated as data-parallel.
      mean, std: `[dim]`: points are clustered as `(x - mean) / std` (default as they are).
      block_rows, buffer_rows: the streaming order (see the module docstring); at most
        `buffer_rows + block_rows + batch_size` points are read into memory at a time.
      min_per_unit: refuse (`check_enough_vectors`) below this many points per centroid.
    """
    t0 = time.time()
    source = _as_source(x)
    n = len(source)
    if n < num_clusters:
        raise ValueError(f"k-means needs [n >= {num_clusters}, dim] points, got {n} points")
    check_enough_vectors(n, num_clusters, minimum=min_per_unit)
    norm = (lambda v: v) if mean is None else (lambda v: (v - mean) / std)
    mesh = data_mesh() if mesh is None else mesh
    ndev = mesh.devices.size
    batch_size = -(-min(batch_size, -(-n // ndev) * ndev) // ndev) * ndev
    rng = np.random.default_rng(seed)
    init_size = min(n, init_size or max(3 * num_clusters, batch_size))
    init_idx = np.sort(rng.choice(n, init_size, replace=False))
    init_x = jnp.asarray(norm(source.take(init_idx)), jnp.float32)
    c = np.asarray(_kmeans_pp(init_x, jax.random.key(seed), num_clusters))
    del init_x
    steps = max(1, math.ceil(epochs * math.ceil(n / batch_size)))
    steps = steps if max_steps is None else min(steps, max_steps)
    stopper = _Stopper(min(1.0, 2.0 * batch_size / (n + 1)), max_no_improvement)
    run = _Run(mesh, c, batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="mini-batch k-means", mininterval=1.0)
    for xb in _batches(source, rng, batch_size, block_rows, buffer_rows, steps):
        inertia = run.step(norm(xb))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia:.4g}", refresh=False)
        if stopper.done(inertia):
            break
    if bar is not None:
        bar.close()
    return KMeansResult(
        np.asarray(run.c),
        np.asarray(run.counts),
        run.history,
        len(run.history),
        time.time() - t0,
        batch_size,
    )


class _Run:
    """The sharded centroids and counts of one fit, updated one batch at a time."""

    def __init__(self, mesh: Mesh, c: np.ndarray, batch_size: int):
        self.mesh, self.batch_size = mesh, batch_size
        self.rep = NamedSharding(mesh, P())
        self.data = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        self.fn = _step_fn(mesh)
        self.c = jax.device_put(c, self.rep)
        self.counts = jax.device_put(np.zeros(len(c), np.float32), self.rep)
        self.history: list[float] = []

    def step(self, batch: np.ndarray) -> float:
        """One update with `batch [<= batch_size, dim]` (zero-weight padded); its inertia."""
        xb = np.zeros((self.batch_size, batch.shape[1]), np.float32)
        wb = np.zeros(self.batch_size, np.float32)
        xb[: len(batch)], wb[: len(batch)] = batch, 1.0
        self.c, self.counts, inertia = self.fn(
            self.c, self.counts, jax.device_put(xb, self.data), jax.device_put(wb, self.data)
        )
        counts_np = np.asarray(self.counts)
        if (counts_np == 0).any():
            c_np, _ = _reseed_empty(np.asarray(self.c), counts_np, xb, wb)
            self.c = jax.device_put(c_np, self.rep)
        self.history.append(float(inertia))
        return self.history[-1]
