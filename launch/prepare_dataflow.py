r"""Run a `tools/prepare.py` stage on Google Cloud Dataflow (a recipe; `--dry_run` prints it).

  python launch/prepare_dataflow.py --project=P --region=us-central1 \
      --bucket=gs://my-bucket/beam --max_workers=64 [--machine_type=n2-standard-8] \
      [--gpu=nvidia-tesla-t4] [--container=IMAGE] [--dry_run] \
      -- --stage=tokens --config=configs/speechssm.py --config.data.name=librilight ...

Everything after `--` goes to `tools/prepare.py` unchanged. The recipe is two commands:

1. `python -m build --sdist` here, so the workers can `pip install` this checkout with the
   `beam` extra (`--extra_package`); with `--container=IMAGE` (an image holding avjax[beam],
   e.g. built FROM apache/beam_python3.11_sdk) the workers use that image instead.
2. `python tools/prepare.py <stage args> --runner=DataflowRunner --project ... --region ...
   --temp_location=<bucket>/tmp --staging_location=<bucket>/staging --max_num_workers ...
   --machine_type ... --job_name ...` (`--gpu`: one GPU per worker with its driver, for the
   HuBERT features of stage `tokens`; `data.hubert_batch_size` sets the batch).

The workers must read the inputs and write the outputs at the paths given: the speech stages
read local files (soundfile, ArrayRecord), so on Dataflow the corpus and the output folder
must be mounted on every worker (a container that mounts the bucket with Cloud Storage FUSE
at the same path as on the launcher); the crops stage also takes `gs://` output folders.
Flink or Spark clusters with a shared filesystem run the same command with their runner.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(args: argparse.Namespace, stage_args: list[str]) -> list[list[str]]:
    """The commands of the recipe (each an argv list), in order."""
    bucket = args.bucket.rstrip("/")
    stage = next((a.split("=", 1)[1] for a in stage_args if a.startswith("--stage=")), "")
    if not stage:
        raise SystemExit("give the stage after `--`: -- --stage=tfds|tokens|crops ...")
    job = args.job_name or f"avjax-{stage}-{getpass.getuser()}-{time.strftime('%Y%m%d-%H%M%S')}"
    flags = [
        "--runner=DataflowRunner",
        f"--project={args.project}",
        f"--region={args.region}",
        f"--temp_location={bucket}/tmp",
        f"--staging_location={bucket}/staging",
        f"--job_name={job.lower().replace('_', '-')}",
        f"--max_num_workers={args.max_workers}",
        f"--machine_type={args.machine_type}",
        "--experiments=use_runner_v2",
    ]
    cmds = []
    if args.container:
        flags.append(f"--sdk_container_image={args.container}")
    else:
        dist = os.path.join(REPO, "dist")
        cmds.append([sys.executable, "-m", "build", "--sdist", "--outdir", dist, REPO])
        flags.append(f"--extra_package={os.path.join(REPO, 'dist', 'avjax-0.1.0.tar.gz')}")
    if args.gpu:
        flags.append(
            f"--dataflow_service_options=worker_accelerator=type:{args.gpu};count:1;"
            "install-nvidia-driver"
        )
    tool = os.path.join(REPO, "tools", "prepare.py")
    cmds.append([sys.executable, tool, *stage_args, *flags])
    return cmds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, stage_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--project", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--bucket", required=True, help="gs:// folder for staging and temp files")
    p.add_argument("--max_workers", type=int, default=32)
    p.add_argument("--machine_type", default="n2-standard-8")
    p.add_argument("--gpu", default="", help="e.g. nvidia-tesla-t4: one per worker")
    p.add_argument("--container", default="", help="worker image holding avjax[beam]")
    p.add_argument("--job_name", default="")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(ours)
    if not args.bucket.startswith("gs://"):
        p.error(f"--bucket must be a gs:// folder, got {args.bucket!r}")
    for cmd in commands(args, stage_args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
