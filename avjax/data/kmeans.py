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
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from avjax.data.units import _assign, _kmeans_pp


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


def fit_minibatch_kmeans(
    x: np.ndarray,
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
) -> KMeansResult:
    """Mini-batch k-means on `x [n, dim]` with batches split over `mesh` (default: all devices).

    Args:
      x: points (host memory), float32.
      num_clusters: k.
      batch_size: points per step (rounded up to a multiple of the mesh size).
      epochs: passes over `x` (each a seeded permutation); `max_steps` caps the step count.
      max_no_improvement: stop when the smoothed batch inertia has not improved for this many
        steps (None: run every step).
      init_size: points used for k-means++ seeding (default `max(3 k, batch_size)`, <= n).
      seed: seeds the seeding and the batch order.
      mesh: the device mesh; every axis is treated as data-parallel.
    """
    import time

    t0 = time.time()
    x = np.asarray(x, np.float32)
    n = len(x)
    if x.ndim != 2 or n < num_clusters:
        raise ValueError(f"k-means needs [n >= {num_clusters}, dim] points, got shape {x.shape}")
    mesh = data_mesh() if mesh is None else mesh
    ndev = mesh.devices.size
    batch_size = -(-min(batch_size, -(-n // ndev) * ndev) // ndev) * ndev
    rng = np.random.default_rng(seed)
    init_size = min(n, init_size or max(3 * num_clusters, batch_size))
    init_idx = np.sort(rng.choice(n, init_size, replace=False))
    c = np.asarray(_kmeans_pp(jnp.asarray(x[init_idx]), jax.random.key(seed), num_clusters))
    counts = np.zeros(num_clusters, np.float32)

    per_epoch = math.ceil(n / batch_size)
    steps = max(1, math.ceil(epochs * per_epoch))
    if max_steps is not None:
        steps = min(steps, max_steps)
    step_fn = _step_fn(mesh)
    data_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="mini-batch k-means", mininterval=1.0)
    history: list[float] = []
    ewa, best, since_best = None, math.inf, 0
    alpha = min(1.0, 2.0 * batch_size / (n + 1))
    order = np.zeros(0, np.int64)
    done = 0
    cj = jax.device_put(c, NamedSharding(mesh, P()))
    countsj = jax.device_put(counts, NamedSharding(mesh, P()))
    for s in range(steps):
        pos = (s % per_epoch) * batch_size
        if pos == 0:
            order = rng.permutation(n)
        idx = order[pos : pos + batch_size]
        xb = np.zeros((batch_size, x.shape[1]), np.float32)
        wb = np.zeros(batch_size, np.float32)
        xb[: len(idx)] = x[idx]
        wb[: len(idx)] = 1.0
        cj, countsj, inertia = step_fn(
            cj, countsj, jax.device_put(xb, data_sharding), jax.device_put(wb, data_sharding)
        )
        done = s + 1
        counts_np = np.asarray(countsj)
        if (counts_np == 0).any():
            c_np, _ = _reseed_empty(np.asarray(cj), counts_np, xb, wb)
            cj = jax.device_put(c_np, NamedSharding(mesh, P()))
        inertia = float(inertia)
        history.append(inertia)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia:.4g}", refresh=False)
        ewa = inertia if ewa is None else (1 - alpha) * ewa + alpha * inertia
        if ewa < best * (1 - 1e-4):
            best, since_best = ewa, 0
        else:
            since_best += 1
            if max_no_improvement is not None and since_best >= max_no_improvement:
                break
    if bar is not None:
        bar.close()
    return KMeansResult(
        np.asarray(cj), np.asarray(countsj), history, done, time.time() - t0, batch_size
    )
