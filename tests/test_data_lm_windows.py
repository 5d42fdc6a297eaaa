"""Token windows for spoken LMs: wrap-around instead of padding, masks, determinism."""

import numpy as np

from avjax.data.speech import lm_windows


def test_cut_window_wraps_to_document_start():
    doc = np.arange(10, dtype=np.int32)
    ex = lm_windows.cut_window(doc, 8, 6)
    np.testing.assert_array_equal(ex["inputs"], [8, 9, 0, 1, 2, 3])
    np.testing.assert_array_equal(ex["targets"], [9, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ex["segment_pos"], [0, 1, 0, 1, 2, 3])
    # The target across the wrap (9 -> 0) is not a real continuation: masked.
    np.testing.assert_array_equal(ex["mask"], [1, 0, 1, 1, 1, 1])


def test_short_document_wraps_repeatedly():
    ex = lm_windows.cut_window(np.array([5, 6, 7], np.int32), 0, 7)
    np.testing.assert_array_equal(ex["inputs"], [5, 6, 7, 5, 6, 7, 5])
    np.testing.assert_array_equal(ex["segment_pos"], [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(ex["mask"], [1, 1, 0, 1, 1, 0, 1])


def test_windows_cover_every_token_once_per_epoch():
    docs = [np.arange(100, dtype=np.int32), np.arange(1000, 1037, dtype=np.int32)]
    idx = lm_windows.window_index([len(d) for d in docs], 8)
    covered = set()
    for d, start in idx:
        ex = lm_windows.cut_window(docs[d], int(start), 8)
        covered |= {(int(d), int(t)) for t in ex["inputs"]}
    assert {(0, t) for t in range(100)} <= covered
    assert {(1, t) for t in range(1000, 1037)} <= covered


def test_train_windows_deterministic_and_resumable():
    docs = [np.arange(300, dtype=np.int32)]
    a = iter(lm_windows.train_windows(docs, 16, 4, seed=3))
    first = [next(a)["inputs"] for _ in range(5)]
    state = a.get_state()
    rest = [next(a)["inputs"] for _ in range(5)]
    b = iter(lm_windows.train_windows(docs, 16, 4, seed=3))
    b.set_state(state)
    np.testing.assert_array_equal(np.stack(rest), np.stack([next(b)["inputs"] for _ in range(5)]))
    c = iter(lm_windows.train_windows(docs, 16, 4, seed=3))
    np.testing.assert_array_equal(np.stack(first), np.stack([next(c)["inputs"] for _ in range(5)]))


def test_processes_get_disjoint_shards():
    docs = [np.arange(640, dtype=np.int32)]
    p0 = next(iter(lm_windows.train_windows(docs, 16, 8, 0, 0, 2)))["inputs"][:, 0]
    p1 = next(iter(lm_windows.train_windows(docs, 16, 8, 0, 1, 2)))["inputs"][:, 0]
    assert not set(p0.tolist()) & set(p1.tolist())


def test_eval_windows_fixed():
    docs = [np.arange(200, dtype=np.int32)]
    a = lm_windows.eval_windows(docs, 16, 4, 3)
    b = lm_windows.eval_windows(docs, 16, 4, 3)
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_packed_windows_restart_segments_and_fill_from_the_last_start():
    docs = [np.arange(100, 105, dtype=np.int32), np.arange(200, 203, dtype=np.int32)]
    pieces, offsets = lm_windows.pack_plan([5, 3], seq_len=9, seed=0)
    assert len(offsets) == 2  # both short documents share one window
    ex = lm_windows.cut_packed(docs, pieces[offsets[0] : offsets[1]], 9)
    first, second = (100, 200) if pieces[0, 0] == 0 else (200, 100)
    n1 = 5 if first == 100 else 3
    assert ex["inputs"][0] == first and ex["inputs"][n1] == second
    np.testing.assert_array_equal(ex["segment_pos"][: n1 + 1], list(range(n1)) + [0])
    # 8 tokens used out of 10: the last 2 continue the second document from its start.
    assert ex["inputs"][-1] == second and ex["segment_pos"][-1] == 0
    assert ex["mask"][n1 - 1] == 0 and ex["mask"][-2] == 0 and ex["mask"].sum() == 9 - 2


def test_pack_plan_covers_every_token_once_in_full_windows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 400, size=300).tolist() + [13_000, 6_001]
    pieces, offsets = lm_windows.pack_plan(lengths, 6000, seed=1)
    covered = {}
    for d, start, length in pieces:
        for t in range(start, start + length - 1):  # tokens with a target in this piece
            covered[(d, t)] = covered.get((d, t), 0) + 1
    assert all(v == 1 for v in covered.values())
    assert len(covered) == sum(n - 1 for n in lengths)
    sizes = np.add.reduceat(pieces[:, 2], offsets[:-1])
    assert sizes.max() <= 6001
    # 59k tokens of short documents fill ~10 windows instead of 300.
    assert len(offsets) - 1 < 20


def test_packed_train_windows_deterministic_resumable_6000_tokens():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=n).astype(np.int32) for n in rng.integers(50, 9000, 40)]
    a = iter(lm_windows.train_windows(docs, 6000, 2, seed=5, pack=True))
    first = next(a)
    assert first["inputs"].shape == (2, 6000) and first["segment_pos"].dtype == np.int32
    state = a.get_state()
    nxt = next(a)
    b = iter(lm_windows.train_windows(docs, 6000, 2, seed=5, pack=True))
    b.set_state(state)
    np.testing.assert_array_equal(next(b)["inputs"], nxt["inputs"])
    p0 = next(iter(lm_windows.train_windows(docs, 6000, 2, 5, 0, 2, pack=True)))["inputs"]
    p1 = next(iter(lm_windows.train_windows(docs, 6000, 2, 5, 1, 2, pack=True)))["inputs"]
    assert not np.array_equal(p0, p1)
