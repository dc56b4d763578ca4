"""Time to the first batch and peak memory of one training process's input, by data size.

For each size: synthetic pairs (benchmarks/data_pipeline.py's generator) as JSONL, prepared
once with samtone-prepare (its throughput per core printed); then, each in a fresh process,
`make_batch_iterator` on the prepared folder and (up to --raw_max pairs) on the JSONL: the
seconds from the call to the first batch, at step 0 and resumed at --resume_step, and the
process's peak RSS (VmHWM) above its RSS once samtone and grain (with jax) are imported.
"2 processes" is one of two processes of a job, reading its half of every global batch
(`local_rows`); "2 grain workers" computes batches in grain's worker processes
(`worker_processes=2`; the RSS is the training process's, not the workers'). Median and
range over --repeats runs.

  python benchmarks/first_batch.py                         # 200k, 400k and 2M pairs
  python benchmarks/first_batch.py --sizes 20000,200000 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_pipeline import write_pairs  # noqa: E402  pylint: disable=wrong-import-position

# Runs in a fresh process: opens the iterator, reads one batch, prints seconds and MiB.
_PROBE = r"""
import json, sys, time
import numpy as np

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024

import grain  # a training process has it (and the jax it imports) loaded already
from samtone.data import pipeline
base = rss("VmRSS:")
data, spm, batch, resume, half, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6])
rows = np.arange(batch // 2) if half else None
start = time.perf_counter()
iterator = pipeline.make_batch_iterator(data, tokenizer=spm, global_batch_size=batch,
                                        local_rows=rows, prefetch=0, worker_processes=workers)
if resume:
    state = iterator.get_state()
    per_epoch = iterator.batches_per_epoch
    state.update(epoch=resume // per_epoch, batch_in_epoch=resume % per_epoch)
    iterator.set_state(state)
next(iterator)
seconds = time.perf_counter() - start
iterator.close()
print(json.dumps({"seconds": seconds, "mib": rss("VmHWM:") - base}))
"""


def probe(data: str, spm: str, batch: int, resume: int, half: bool, workers: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _PROBE, data, spm, str(batch), str(resume),
                             "1" if half else "0", str(workers)],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(values: list[float], unit: str, digits: int) -> str:
    return (f"{np.median(values):.{digits}f} {unit} ({min(values):.{digits}f}-"
            f"{max(values):.{digits}f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200000,400000,2000000", help="pairs, comma-separated")
    parser.add_argument("--raw_max", type=int, default=400_000,
                        help="largest size also timed from the JSONL (it holds all in RAM)")
    parser.add_argument("--global_batch_size", type=int, default=512)
    parser.add_argument("--resume_step", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=2000)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]

    # pylint: disable=import-outside-toplevel
    from samtone.data import prepare
    from samtone.data.tokenizer import train_sentencepiece

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    print("command:", shlex.join(["python"] + sys.argv), f" commit: {commit}")
    print(f"cpus: {os.cpu_count()}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        spm = None
        for size in sorted(sizes):
            path = os.path.join(folder, f"pairs_{size}.jsonl")
            write_pairs(path, size, 0)
            if spm is None:
                with open(path, encoding="utf-8") as f:
                    sample = [json.loads(next(f))["passage"] for _ in range(10_000)]
                spm = train_sentencepiece(sample, os.path.join(folder, "spm"),
                                          args.vocab_size, num_threads=os.cpu_count() or 1)
            output = os.path.join(folder, f"prepared_{size}")
            start = time.perf_counter()
            prepare.prepare(path, spm, output, prepare.Settings(), shards=16, progress=False)
            seconds = time.perf_counter() - start
            per_core = size / seconds / (os.cpu_count() or 1)
            print(f"{size:,} pairs: samtone-prepare {seconds:.1f} s, {per_core:,.0f} pairs/s "
                  "per core", flush=True)
            sources = [("prepared", output)] + ([("JSONL", path)] if size <= args.raw_max else [])
            for name, data in sources:
                cases = [(False, 0, 0), (True, 0, 0), (False, args.resume_step, 0)]
                if name == "prepared":  # grain's worker processes: their start-up cost
                    cases.append((False, args.resume_step, 2))
                for half, resume, workers in cases:
                    runs = [probe(data, spm, args.global_batch_size, resume, half, workers)
                            for _ in range(args.repeats)]
                    process = ("2 processes" if half else "1 process") + (
                        f", {workers} grain workers" if workers else "")
                    rows.append((size, name, process, resume,
                                 summary([r["seconds"] for r in runs], "s", 2),
                                 summary([r["mib"] for r in runs], "MiB", 0)))
                    print("  ", rows[-1], flush=True)
            os.remove(path)
    print()
    print("| pairs | input | process | start step | time to first batch | peak RSS above "
          "imports |")
    print("|---|---|---|---|---|---|")
    for size, name, process, resume, seconds, mib in rows:
        print(f"| {size:,} | {name} | {process} | {resume:,} | {seconds} | {mib} |")


if __name__ == "__main__":
    main()
