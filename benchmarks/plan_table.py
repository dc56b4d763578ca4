"""The paper recipes' memory per device on 16, 64 and 256 devices, from `samtone-plan`.

    python benchmarks/plan_table.py [--sizes base,large,xxl] [--devices 16,64,256] \
        [--ladder none:1,full:1,full:4,full:16] [--output plan_table.json]

For each recipe and device count it compiles the train step ahead of time (fake CPU devices,
nothing allocated) under a ladder of settings, from cheapest to most memory-saving:
remat none, remat full, remat full + 4 cached-gradient microbatches, + 16 microbatches;
and prints, for each device memory (16 GiB v5e, 32 GiB v4, 80 GiB H100), the first setting
that fits. Each compile runs in its own `samtone-plan` process (the device count is fixed at
start-up). CPU compiles stand in for TPU/GPU ones: XLA's CPU memory scheduler is no better
than theirs, so a "fits" here is conservative.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MEMORIES_GIB = (16, 32, 80)
LADDER = (("none", 1), ("full", 1), ("full", 4), ("full", 16))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan(size: str, devices: int, remat: str, microbatches: int, timeout: int) -> dict | None:
    command = [sys.executable, "-m", "samtone.cli.plan",
               f"--gin_file=configs/paper_{size}_ade_spl_samtone.gin", f"--devices={devices}",
               "--json", f"--gin.t5_1_1_config.remat_policy='{remat}'",
               f"--gin.train.microbatches={microbatches}"]
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  {size} {devices} {remat} x{microbatches}: compile timed out", flush=True)
        return None
    if result.returncode != 0:
        print(f"  {size} {devices} {remat} x{microbatches}: failed: {result.stderr[-400:]}",
              flush=True)
        return None
    found = json.loads(result.stdout.strip().splitlines()[-1])
    found.update(remat=remat, microbatches=microbatches,
                 compile_seconds=round(time.monotonic() - started, 1))
    print(f"  {size} {devices} remat {remat} x{microbatches}: "
          f"{found['total_bytes'] / 2**30:.2f} GiB/device ({found['compile_seconds']} s)",
          flush=True)
    return found


def _rung(parser: argparse.ArgumentParser, item: str) -> tuple[str, int]:
    """'full:4' -> ('full', 4); anything else is a --ladder error naming the item."""
    remat, _, microbatches = item.partition(":")
    if remat not in ("none", "full", "dots") or not microbatches.isdigit() or int(microbatches) < 1:
        parser.error(f"--ladder item {item!r}: expected REMAT:MICROBATCHES with REMAT one of "
                     "none, full, dots and MICROBATCHES a positive integer, e.g. full:4")
    return remat, int(microbatches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="base,large,xxl")
    parser.add_argument("--devices", default="16,64,256")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per compile")
    parser.add_argument("--ladder", default=",".join(f"{r}:{m}" for r, m in LADDER),
                        help="settings to try, cheapest first, as remat:microbatches pairs")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    ladder = [_rung(parser, item) for item in args.ladder.split(",")]
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]), flush=True)
    rows = []
    for size in args.sizes.split(","):
        for devices in map(int, args.devices.split(",")):
            needed = {memory: None for memory in MEMORIES_GIB}
            for remat, microbatches in ladder:
                found = plan(size, devices, remat, microbatches, args.timeout)
                if found is None:
                    continue
                rows.append({"size": size, "devices": devices, **found})
                for memory in MEMORIES_GIB:
                    if needed[memory] is None and found["total_bytes"] <= memory * 2**30:
                        needed[memory] = (remat, microbatches, found["total_bytes"])
                if all(value is not None for value in needed.values()):
                    break
            cells = [f"remat {v[0]}, x{v[1]} ({v[2] / 2**30:.1f} GiB)" if v else "does not fit"
                     for v in (needed[m] for m in MEMORIES_GIB)]
            print(f"| {size} | {devices} | " + " | ".join(cells) + " |", flush=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
