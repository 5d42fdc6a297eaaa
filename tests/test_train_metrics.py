"""Metric writers: TensorBoard events staged locally and uploaded for remote workdirs."""

import glob
import os

import tensorflow as tf

from avjax.train import metrics as metrics_lib


def _scalars(folder) -> dict[int, float]:
    out = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == "loss":
                    out[event.step] = float(tf.make_ndarray(v.tensor))
    return out


def test_staged_writer_uploads_events_and_cleans_up(tmp_path):
    target = tmp_path / "bucket" / "run"
    w = metrics_lib.StagedSummaryWriter(target, upload_every_s=3600)
    staging = w._local
    w.write_scalars(1, {"loss": 2.5})
    assert _scalars(target) == {}  # not yet due: nothing uploaded
    w.flush()
    assert _scalars(target) == {1: 2.5}
    w.write_scalars(2, {"loss": 1.5})
    w.close()
    assert _scalars(target) == {1: 2.5, 2: 1.5}
    assert not os.path.exists(staging)


def test_summary_writer_is_direct_for_local_folders(tmp_path):
    w = metrics_lib.summary_writer(tmp_path / "tb")
    assert not isinstance(w, metrics_lib.StagedSummaryWriter)
    w.write_scalars(3, {"loss": 0.5})
    w.close()
    assert _scalars(tmp_path / "tb") == {3: 0.5}
