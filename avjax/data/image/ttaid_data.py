"""The data module of TTAID (test-time adaptive denoising): noisy/clean crop pairs.

    data = TTAIDData.from_config(config, workdir)
    facts = data.prepare()                                  # photographs or a benchmark
    it = data.train_dataset(process_index, process_count)   # endless, checkpointable
    held = data.heldout("camera", size=96)                  # [(name, noisy, clean)]

Batches are `{"noisy", "clean": [batch, crop, crop, 3] float32 in [0, 1]}`; in the meta
stages every example is one task (one crop adapted on its own). Training crops are a pure
function of (seed, example index), so grain's iterator position is the whole data state and
resume is exact. With `data.name="default"` the clean crops come from the scikit-image
photographs (`corpus.TRAIN`) and noise is added on the fly (`data.noise`: "auto" = synthetic
for `pretrain` / `meta_aux`, camera for `meta_transfer`); with a benchmark name, crops are
cut from its real pairs (the last `heldout_fraction` of pairs held out).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from avjax.data.image import benchmarks, corpus, noise
from avjax.data.module import DataModule

Batch = dict[str, np.ndarray]


def _lattice(shape: tuple[int, ...], size: int, grid: int) -> list[tuple[int, int]]:
    """Top-left corners of `size` crops of an image `[h, w]`: the central one (`grid` = 1)
    or a `grid` x `grid` lattice spanning the image evenly."""
    h, w = shape
    if grid == 1:
        return [((h - size) // 2, (w - size) // 2)]
    ys = np.linspace(0, h - size, grid).round().astype(int)
    xs = np.linspace(0, w - size, grid).round().astype(int)
    return [(int(y), int(x)) for y in ys for x in xs]


@dataclasses.dataclass
class TTAIDData(DataModule):
    """Noisy/clean crops of one image source, prepared once, lazily.

    Fields as `DataModule` (`data`: `config.data` with `name`, `crop`, `noise`, `manual_dir`,
    `skip_bad`, ...; nothing is written, so `workdir` and `read_only` change nothing), and
    `stage`: `config.stage` (chooses the noise when `data.noise == "auto"`).
    """

    stage: str = "pretrain"

    @classmethod
    def from_config(cls, config: Any, workdir: str) -> TTAIDData:
        data = super().from_config(config, workdir)
        data.stage = str(config.stage)
        return data

    @property
    def noise_family(self) -> str:
        """The training noise: `data.noise`, or by stage when it is "auto"."""
        fam = str(self.data.noise)
        if fam == "auto":
            return "camera" if self.stage == "meta_transfer" else "synthetic"
        if fam not in noise.FAMILIES:
            raise ValueError(f"config.data.noise={fam!r} is not 'auto' or one of {noise.FAMILIES}")
        return fam

    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Loads the photographs (or benchmark pairs) once; returns facts worth logging."""
        del read_only
        if self._prepared is not None:
            return self._prepared["facts"]
        dc, name = self.data, str(self.data.name)
        if name == "default":
            train = [
                (n, None, img) for n, img in zip(corpus.TRAIN, corpus.train_images(), strict=True)
            ]
            held = [
                (n, None, img)
                for n, img in zip(corpus.HELDOUT, corpus.heldout_images(), strict=True)
            ]
            skipped = 0
        else:
            pairs, skipped = benchmarks.load(name, str(dc.manual_dir), bool(dc.skip_bad))
            pairs = [
                (n, a.astype(np.float32) / 255, b.astype(np.float32) / 255) for n, a, b in pairs
            ]
            n_held = max(1, int(round(len(pairs) * float(dc.heldout_fraction))))
            if len(pairs) <= n_held:
                raise ValueError(f"{name}: {len(pairs)} pairs are too few to hold {n_held} out")
            train, held = pairs[:-n_held], pairs[-n_held:]
        crop = int(dc.crop)
        small = [n for n, _, c in train if min(c.shape[:2]) < crop]
        if small:
            raise ValueError(f"images {small} are smaller than config.data.crop={crop}")
        facts = {
            "source": name,
            "train_images": len(train),
            "heldout_images": len(held),
            "skipped_pairs": skipped,
            "noise": self.noise_family,
        }
        self._prepared = {"facts": facts, "train": train, "heldout": held}
        return facts

    def _example(self, index: int) -> Batch:
        """The training pair of example `index`: a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed, int(index)])
        train = self._prepared["train"]
        _, noisy, clean = train[int(rng.integers(len(train)))]
        crop = int(self.data.crop)
        if noisy is None:
            c = corpus.random_crop(clean, crop, rng)
            return {"noisy": noise.apply(self.noise_family, c, rng), "clean": c}
        both = corpus.random_crop(np.concatenate([noisy, clean], axis=-1), crop, rng)
        return {"noisy": both[..., :3], "clean": both[..., 3:]}

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """Endless `[batch_size // process_count, crop, crop, 3]` pairs (checkpointable)."""
        self.prepare()
        ds = grain.MapDataset.range(2**31 - 1)[process_index::process_count]
        ds = ds.map(self._example)
        return ds.batch(
            self.per_process_batch(process_count), drop_remainder=True
        ).to_iter_dataset()

    def heldout(
        self, family: str, size: int, grid: int = 1, draws: int = 1
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """`(name, noisy, clean)` float32 `[size, size, 3]` crops of the held-out images with
        `family` noise: `grid` = 1 the central crop, else a `grid` x `grid` lattice of crops
        spread evenly over the image (named `<image>_c<k>`), each with `draws` noise draws
        (`_d<j>`), seeded by (image, family, crop, draw); `grid = draws = 1` is the original
        one-draw central crop. Benchmark pairs keep their own noise (`family` and `draws`
        are ignored)."""
        self.prepare()
        out = []
        for i, (name, noisy, clean) in enumerate(self._prepared["heldout"]):
            s = min(size, *clean.shape[:2]) // 2 * 2
            for k, (y, x) in enumerate(_lattice(clean.shape[:2], s, int(grid))):
                c = np.ascontiguousarray(clean[y : y + s, x : x + s])
                tag = name if grid == 1 else f"{name}_c{k}"
                if noisy is not None:
                    out.append((tag, np.ascontiguousarray(noisy[y : y + s, x : x + s]), c))
                    continue
                for j in range(int(draws)):
                    extra = [] if grid == 1 and draws == 1 else [k, j]
                    fam = noise.FAMILIES.index(family)
                    rng = np.random.default_rng([self.seed, 7919, i, fam, *extra])
                    out.append(
                        (tag if draws == 1 else f"{tag}_d{j}", noise.apply(family, c, rng), c)
                    )
        return out

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """Fixed held-out batches (training crop size, the training noise), this process's
        share: crops of the held-out images, cycled."""
        self.prepare()
        crop, per = int(self.data.crop), self.per_process_batch(process_count)
        held = self._prepared["heldout"]
        batches = []
        for b in range(self.num_eval_batches):
            items = []
            for j in range(per):
                k = (b * self.batch_size + process_index * per + j) % len(held)
                rng = np.random.default_rng([self.seed, 104729, b, process_index, j])
                _, noisy, clean = held[k]
                if noisy is None:
                    c = corpus.random_crop(clean, crop, rng)
                    items.append({"noisy": noise.apply(self.noise_family, c, rng), "clean": c})
                else:
                    both = corpus.random_crop(np.concatenate([noisy, clean], -1), crop, rng)
                    items.append({"noisy": both[..., :3], "clean": both[..., 3:]})
            batches.append({k: np.stack([it[k] for it in items]) for k in ("noisy", "clean")})
        return batches

    def dummy_batch(self) -> Batch:
        """A global `[batch_size, crop, crop, 3]` batch of zeros."""
        shape = (self.batch_size, int(self.data.crop), int(self.data.crop), 3)
        return {"noisy": np.zeros(shape, np.float32), "clean": np.zeros(shape, np.float32)}

    def compatibility(self) -> dict[str, Any]:
        return {"data": {k: self.data[k] for k in ("name", "crop")}}
