"""Memory-mapped token stores: consolidation, reuse, crash safety, windows equal to lists."""

import os
import pickle

import numpy as np
import pytest

from avjax.data.speech import lm_windows, token_store, tokenize
from avjax.data.speech.token_store import TokenStore

NUM_UNITS = 50


class _Tokenizer:
    """Stands in for a `UnitTokenizer`: the units are written into the audio (no features)."""

    features = "logmel"

    def __init__(self, num_units: int = NUM_UNITS):
        self.num_units = num_units
        self.centroids = np.arange(num_units, dtype=np.float32)[:, None]
        self.mean = np.zeros(1, np.float32)
        self.std = np.ones(1, np.float32)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        n = len(wav) // 640
        return np.rint(wav[: n * 640 : 640] * 1e5).astype(np.int32)


def _source(num_units: int = NUM_UNITS, seed: int = 0) -> list[dict]:
    """Utterances of 4 documents (one with an empty utterance); units encoded in the audio."""
    rng = np.random.default_rng(seed)
    docs = [
        ("a", "s1", [30, 0, 17]),
        ("b", "s2", [40]),
        ("c", "s1", [5, 9, 22, 3]),
        ("d", "s3", [1]),
    ]
    out = []
    for doc, spk, sizes in docs:
        for k, n in enumerate(sizes):
            units = rng.integers(0, num_units, n)
            wav = np.zeros(n * 640 + 100, np.float32)
            wav[: n * 640 : 640] = units / 1e5
            out.append(
                {"audio": wav, "speaker": spk, "document": doc, "id": f"{doc}-{k}", "index": k}
            )
    return out


@pytest.fixture
def split(tmp_path):
    out = str(tmp_path / "tokens")
    tokenize.tokenize_split(_source(), _Tokenizer(), out, "train", num_shards=3, progress=False)
    return out


def _as_list(store):
    return [np.asarray(store[i], np.int32) for i in range(len(store))]


@pytest.mark.parametrize("join", [True, False])
def test_store_round_trip_equals_tokenize_documents(split, join):
    stats = token_store.consolidate(split, "train", num_units=NUM_UNITS, join_documents=join)
    assert not stats.reused and stats.records == 9
    store = TokenStore.open(stats.path)
    records = list(tokenize.read_split(split, "train"))
    if join:
        ref = tokenize.documents(iter(records))
    else:
        ref = [(r["id"], r["speaker"], r["units"]) for r in records]
    assert store.doc_ids == [d for d, _, _ in ref]
    assert store.speakers == [s for _, s, _ in ref]
    assert len(store) == len(ref) == (4 if join else 9)
    np.testing.assert_array_equal(store.lengths, [len(u) for _, _, u in ref])
    for i, (_, _, units) in enumerate(ref):
        assert store[i].dtype == np.uint16
        np.testing.assert_array_equal(store[i], units)
    assert [len(d) for d in store] == [len(u) for _, _, u in ref]  # iteration
    np.testing.assert_array_equal(store[-1], ref[-1][2])
    with pytest.raises(IndexError):
        store[len(ref)]
    assert store.num_tokens == sum(len(u) for _, _, u in ref) == stats.num_tokens
    assert token_store.is_current(split, "train", NUM_UNITS, join)
    assert token_store.consolidate(split, "train", num_units=NUM_UNITS, join_documents=join).reused


def test_store_is_rebuilt_when_a_shard_is_retokenised(split):
    path = token_store.consolidate(split, "train", num_units=NUM_UNITS).path
    first = os.path.getmtime(os.path.join(path, token_store.MANIFEST))
    os.remove(tokenize.done_path(tokenize.shard_path(split, "train", 1, 3)))
    assert not token_store.is_current(split, "train", NUM_UNITS)
    with pytest.raises(FileNotFoundError, match="not tokenised yet"):
        token_store.consolidate(split, "train", num_units=NUM_UNITS)
    tokenize.tokenize_split(_source(), _Tokenizer(), split, "train", num_shards=3, progress=False)
    assert not token_store.is_current(split, "train", NUM_UNITS)  # the marker changed
    again = token_store.consolidate(split, "train", num_units=NUM_UNITS)
    assert not again.reused and again.path == path
    assert os.path.getmtime(os.path.join(path, token_store.MANIFEST)) >= first
    # No temporary or old folder is left beside it.
    assert [n for n in os.listdir(split + "/train") if n.startswith("store")] == ["store-documents"]


def test_crash_mid_consolidation_leaves_no_half_store(split, monkeypatch):
    path = token_store.store_path(split, "train")
    real = tokenize.decode_header
    calls = []

    def dies_on_the_fifth_record(data):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(data)

    monkeypatch.setattr(tokenize, "decode_header", dies_on_the_fifth_record)
    with pytest.raises(RuntimeError, match="killed"):
        token_store.consolidate(split, "train", num_units=NUM_UNITS)
    folder = os.path.dirname(path)
    assert not os.path.exists(path)
    assert not [n for n in os.listdir(folder) if n.startswith("store-")]
    with pytest.raises(FileNotFoundError, match="no token store here"):
        TokenStore.open(path)
    assert not token_store.is_current(split, "train", NUM_UNITS)
    monkeypatch.setattr(tokenize, "decode_header", real)
    # A hard kill leaves its temporary folder behind: the next run clears it and builds.
    os.makedirs(path + ".tmp-999999")
    with open(os.path.join(path + ".tmp-999999", token_store.TOKENS), "wb") as f:
        f.write(b"half")
    store = TokenStore.open(token_store.consolidate(split, "train", num_units=NUM_UNITS).path)
    assert len(store) == 4 and not os.path.exists(path + ".tmp-999999")
    # Wrong vocabulary size: the out-of-range id is named with its shard.
    with pytest.raises(ValueError, match=r"units-0000\d-of-00003.array_record: unit id \d+ >= "):
        token_store.consolidate(split, "train", num_units=3)


def test_unigram_counts_subset_concat_and_dtypes(split):
    store = TokenStore.open(token_store.consolidate(split, "train", num_units=NUM_UNITS).path)
    docs = _as_list(store)
    full = np.bincount(np.concatenate(docs), minlength=NUM_UNITS)
    np.testing.assert_array_equal(store.unigram_counts(NUM_UNITS), full)
    sub = store.subset([3, 0, 2])
    assert sub.doc_ids == ["d", "a", "c"] and len(sub) == 3
    np.testing.assert_array_equal(sub[0], docs[3])
    ref = np.bincount(np.concatenate([docs[3], docs[0], docs[2]]), minlength=NUM_UNITS)
    np.testing.assert_array_equal(sub.unigram_counts(NUM_UNITS), ref)
    both = TokenStore.concat([store, sub])
    assert len(both) == 7 and both.doc_ids[4:] == ["d", "a", "c"]
    np.testing.assert_array_equal(both.unigram_counts(NUM_UNITS), full + ref)
    np.testing.assert_array_equal(
        both.lengths, [len(d) for d in docs + [docs[3], docs[0], docs[2]]]
    )
    # Chunked counting (a chunk smaller than a document) agrees too.
    old = token_store._COUNT_CHUNK
    try:
        token_store._COUNT_CHUNK = 7
        np.testing.assert_array_equal(sub.unigram_counts(NUM_UNITS), ref)
    finally:
        token_store._COUNT_CHUNK = old
    as_int = sub.with_dtype(np.int32)
    assert as_int[1].dtype == np.int32 and not isinstance(as_int[1], np.memmap)
    np.testing.assert_array_equal(as_int[1], docs[0])


def test_large_vocabularies_are_stored_as_int32(tmp_path):
    out = str(tmp_path / "tokens")
    tokenize.tokenize_split(
        _source(70_000), _Tokenizer(70_000), out, "train", num_shards=2, progress=False
    )
    store = TokenStore.open(token_store.consolidate(out, "train", num_units=70_000).path)
    ref = tokenize.documents(tokenize.read_split(out, "train"))
    assert store[0].dtype == np.int32 and max(int(d.max()) for d in store if len(d)) > 65535
    for i, (_, _, units) in enumerate(ref):
        np.testing.assert_array_equal(store[i], units)


def test_store_documents_are_views_of_the_map_and_pickle_by_path(split):
    store = TokenStore.open(token_store.consolidate(split, "train", num_units=NUM_UNITS).path)
    doc = store[2]
    mmap = store._parts[0].mmap  # noqa: SLF001
    assert isinstance(mmap, np.memmap) and mmap.filename.endswith("tokens.npy")
    assert np.shares_memory(doc, mmap) and not doc.flags.writeable and not doc.flags.owndata
    blob = pickle.dumps(store.subset([2, 0]))
    assert len(blob) < 2000  # paths and indices, not tokens
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back[0], doc)
    assert np.shares_memory(back[0], back._parts[0].mmap)  # noqa: SLF001


class _Lazy:
    """A lazy document sequence that counts reads (windows must not read documents up front)."""

    def __init__(self, docs):
        self.docs, self.reads = docs, 0
        self.lengths = np.array([len(d) for d in docs])

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        self.reads += 1
        return self.docs[i]


def _batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("pack", [False, True])
def test_windows_from_a_store_equal_windows_from_the_list(split, pack):
    store = TokenStore.open(token_store.consolidate(split, "train", num_units=NUM_UNITS).path)
    docs = _as_list(store)
    for seq_len in (8, 23):
        a = _batches(lm_windows.train_windows(store, seq_len, 2, seed=4, pack=pack), 9)
        b = _batches(lm_windows.train_windows(docs, seq_len, 2, seed=4, pack=pack), 9)
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
        ea = lm_windows.eval_windows(store, seq_len, 2, 3)
        eb = lm_windows.eval_windows(docs, seq_len, 2, 3)
        assert len(ea) == len(eb) == 3
        for x, y in zip(ea, eb, strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    # Plans come from `lengths`: building the sources reads no document.
    lazy = _Lazy(docs)
    source = lm_windows._Packed(lazy, 8, 0) if pack else lm_windows._Windows(lazy, 8)  # noqa: SLF001
    assert lazy.reads == 0 and len(source) > 0
    source[0]
    assert 0 < lazy.reads <= 3


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_windows_over_a_large_store_take_no_anonymous_memory(tmp_path):
    class Big:  # 800 utterances of 6,000-18,000 units: ~10M tokens (40 MB as int32 lists)
        def __len__(self):
            return 800

        def __getitem__(self, i):
            n = 6000 + (i * 7919) % 12000
            return {"audio": np.array([n, i], np.float32), "document": f"d{i // 3}"}

    class Tok(_Tokenizer):
        def encode(self, wav):
            return np.random.default_rng(int(wav[1])).integers(0, 500, int(wav[0]))

    out = str(tmp_path / "big")
    tokenize.tokenize_split(Big(), Tok(500), out, "train", num_shards=4, progress=False)
    path = token_store.consolidate(out, "train", num_units=500).path
    before = _rss_anon_mb()
    store = TokenStore.open(path)
    assert store.num_tokens > 9_000_000
    sources = [lm_windows._Windows(store, 6000), lm_windows._Packed(store, 6000, 0)]  # noqa: SLF001
    for src in sources:
        for i in range(0, len(src), 7):
            assert src[i]["inputs"].shape == (6000,)
    assert store.unigram_counts(500).sum() == store.num_tokens
    # Window plans and the examples read: far below the tokens (40 MB as int32 lists).
    assert _rss_anon_mb() - before < 8
    assert next(iter(lm_windows.train_windows(store, 6000, 4, seed=0)))["inputs"].shape == (4, 6000)
