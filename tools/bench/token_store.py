r"""Benchmark: the memory-mapped token store vs in-memory document lists, same run.

  python tools/bench/token_store.py [--files=10000] [--json=PATH]

Writes a synthetic tokenised split (LibriLight-like: files of 500-9,500 random units, 1-8
files per document; ~50 M tokens with the default 10,000 files) in a temporary folder,
consolidates it into a `TokenStore` (avjax/data/speech/token_store.py), then, each in a fresh
process (so memory is its own), builds the training pipeline of 6,000-token windows, batch 8
(`lm_windows.train_windows`, wrapped and packed) from the store and from the in-memory lists
training used before the store (`tokenize.documents(tokenize.read_split(...))`), and reads
300 batches. Prints set-up time, examples/s, anonymous memory after set-up and peak RSS side
by side; `--json` gets the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from avjax.data.speech import lm_windows, token_store, tokenize  # noqa: E402

NUM_UNITS = 500
SEQ_LEN = 6000
BATCH = 8
BATCHES = 300


class _RandomUnits:
    """Stands in for a `UnitTokenizer`: the "audio" `[n, seed]` encodes to n random units."""

    features = "logmel"
    num_units = NUM_UNITS
    centroids = np.zeros((NUM_UNITS, 1), np.float32)
    mean = np.zeros(1, np.float32)
    std = np.ones(1, np.float32)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        n, seed = int(wav[0]), int(wav[1])
        return np.random.default_rng(seed).integers(0, NUM_UNITS, n).astype(np.int32)


class _Source:
    """`files` records of 500-9,500 units, 1-8 consecutive records per document."""

    def __init__(self, files: int):
        rng = np.random.default_rng(0)
        self.sizes = rng.integers(500, 9500, files)
        self.doc = np.repeat(np.arange(files), rng.integers(1, 9, files))[:files]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> dict:
        return {
            "audio": np.array([self.sizes[i], i], np.float32),
            "speaker": f"s{self.doc[i] % 100}",
            "document": f"d{self.doc[i]}",
            "id": f"u{i}",
        }


def _memory() -> dict[str, float]:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anon_mb": int(status["RssAnon"].split()[0]) / 1024,
    }


def read(tokens_dir: str, kind: str, pack: bool) -> dict:
    """One pipeline from the store or the lists: set-up time, examples/s, memory."""
    t0 = time.time()
    if kind == "store":
        docs = token_store.TokenStore.open(token_store.store_path(tokens_dir, "train"))
    else:
        docs = [u for _, _, u in tokenize.documents(tokenize.read_split(tokens_dir, "train"))]
    it = iter(lm_windows.train_windows(docs, SEQ_LEN, BATCH, seed=0, pack=pack))
    setup_s = time.time() - t0
    anon_after_setup = _memory()["anon_mb"]
    next(it)
    t1 = time.time()
    for _ in range(BATCHES):
        batch = next(it)
    assert batch["inputs"].shape == (BATCH, SEQ_LEN)
    return {
        "source": kind,
        "windows": "packed" if pack else "wrapped",
        "setup_s": setup_s,
        "examples_per_s": BATCHES * BATCH / (time.time() - t1),
        "anon_mb_after_setup": anon_after_setup,
        **_memory(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000, help="records (~5,000 tokens each)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--_read", nargs=3, help=argparse.SUPPRESS)  # DIR store|list wrapped|packed
    args = ap.parse_args()
    if args._read:
        d, kind, windows = args._read
        print(json.dumps(read(d, kind, windows == "packed")))
        return
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        st = tokenize.tokenize_split(
            _Source(args.files), _RandomUnits(), d, "train", num_shards=16, progress=False
        )
        print(f"synthetic split: {st.tokens:,} tokens in {time.time() - t0:.0f} s")
        store = token_store.consolidate(d, "train", num_units=NUM_UNITS)
        consolidation = {
            "tokens": store.num_tokens,
            "docs": store.num_docs,
            "seconds": store.seconds,
            "mtokens_per_s": store.tokens_per_second / 1e6,
        }
        print(
            f"consolidated {store.num_tokens:,} tokens / {store.num_docs:,} documents in "
            f"{store.seconds:.2f} s ({consolidation['mtokens_per_s']:.1f} M tokens/s)"
        )
        rows = []
        print(
            f"{'windows':<9}{'source':<7}{'set-up s':>10}{'examples/s':>12}"
            f"{'anon MB':>10}{'peak RSS MB':>13}"
        )
        for windows in ("wrapped", "packed"):
            for kind in ("store", "list"):
                out = subprocess.run(
                    [sys.executable, __file__, "--_read", d, kind, windows],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rows.append(r)
                print(
                    f"{windows:<9}{kind:<7}{r['setup_s']:>10.2f}{r['examples_per_s']:>12.0f}"
                    f"{r['anon_mb_after_setup']:>10.0f}{r['peak_rss_mb']:>13.0f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"consolidation": consolidation, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
