"""Token windows for spoken LMs: wrap-around instead of padding, masks, determinism."""

import numpy as np

from avjax.data import lm_windows


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
