"""One process of a 2-process SpeechSSM job on one machine, driven by
tests/test_data_multiprocess.py: data preparation (corpus, units, vocoder) then a few steps.

  python tests/multihost_prepare_worker.py WORKDIR CACHE_DIR OVERRIDES_JSON

`CACHE_DIR` may contain `{process}` (replaced by this process's index) to give each process
its own node-local cache. Writes `<WORKDIR>.p<index>.json` with what this process saw (the
facts, or the error's type and message).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
from absl import logging  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("WORKER_DEVICES", "4")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from avjax import main as avjax_main  # noqa: E402


def main() -> None:
    workdir, cache, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    logging.set_verbosity(logging.INFO)
    avjax_main._maybe_initialize_distributed()  # noqa: SLF001
    from test_speechssm import _config  # (after: it asks jax for devices)

    pi = jax.process_index()
    cfg = _config(cache.format(process=pi), **overrides)
    out = f"{workdir}.p{pi}.json"
    try:
        summary = avjax_main.run(cfg, workdir, "train")
        result = {"ok": True, "summary": summary}
    except Exception as e:  # noqa: BLE001 (reported to the test)
        result = {"ok": False, "type": type(e).__name__, "message": str(e)}
    with open(out, "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main()
