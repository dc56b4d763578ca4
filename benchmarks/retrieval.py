"""Throughput of exact top-k search (samtone.search) on a synthetic BEIR-sized corpus.

    python benchmarks/retrieval.py --passages 100000 --queries 1000 --dim 768 --k 10

Passages are random unit vectors; each query is a noisy copy of one passage (its "relevant"
one), normalised, so the ranking has structure and the top-1 hit rate is a sanity check,
not a metric. Stages: making the data, building the index (host -> devices), the first
search (with compilation), then `--repeats` timed searches of all queries. Prints numbers
only; it asserts nothing. Runs on the real devices (one CPU device on a CPU host) unless
`--fake_devices` asks for more.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exclude", type=int, default=0,
                        help="passages excluded per query (as mining excludes positives)")
    parser.add_argument("--approximate", action="store_true", help="jax.lax.approx_max_k")
    parser.add_argument("--recall_target", type=float, default=0.95)
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="queries per chunk (default: samtone.search's choice)")
    parser.add_argument("--mesh", default="-1,1", help="data,model mesh shape; -1 = the rest")
    parser.add_argument("--axis", default=None, help="mesh axis splitting the corpus "
                        "(default: all; the others split the queries)")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches after the first")
    parser.add_argument("--fake_devices", type=int, default=0,
                        help="CPU only: pretend to have this many devices (XLA host platform)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fake_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from samtone import partitioning, search  # pylint: disable=import-outside-toplevel

    print("command:", shlex.join([sys.executable, *sys.argv]))
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
          f"jax {jax.__version__}, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    mode = f"approximate (recall_target={args.recall_target})" if args.approximate else "exact"
    print(f"corpus {args.passages} x {args.dim}, {args.queries} queries, k={args.k}, {mode}"
          f"{f', {args.exclude} excluded per query' if args.exclude else ''}")

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    passages = rng.standard_normal((args.passages, args.dim), dtype=np.float32)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    relevant = rng.integers(0, args.passages, args.queries)
    queries = passages[relevant] + rng.standard_normal((args.queries, args.dim),
                                                       dtype=np.float32) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exclude = None
    if args.exclude:  # never the relevant passage, so the sanity check still applies
        exclude = [set(rng.integers(0, args.passages, args.exclude).tolist()) - {int(r)}
                   for r in relevant]
    data_s = time.perf_counter() - start

    mesh = partitioning.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    start = time.perf_counter()
    index = search.PassageIndex.from_embeddings(passages, mesh, axis=args.axis)
    index.embeddings.block_until_ready()
    build_s = time.perf_counter() - start

    def run():
        begin = time.perf_counter()
        result = index.search(queries, args.k, exclude=exclude, approximate=args.approximate,
                              recall_target=args.recall_target, chunk_size=args.chunk_size,
                              progress=False)
        return result, time.perf_counter() - begin  # results are numpy: already waited for

    (_, indices), first_s = run()
    times = [run()[1] for _ in range(args.repeats)]
    search_s = min(times) if times else first_s
    hit_rate = float(np.mean(indices[:, 0] == relevant))

    print(f"data:   {data_s:8.3f} s  (random unit vectors, host)")
    print(f"build:  {build_s:8.3f} s  {args.passages / build_s:12,.0f} passages/s "
          f"(host -> {len(devices)} device(s), {index.embeddings.sharding.spec})")
    print(f"first:  {first_s:8.3f} s  (search with compilation)")
    print(f"search: {search_s:8.3f} s  {args.queries / search_s:12,.0f} queries/s  "
          f"{args.passages * args.queries / search_s:,.3g} query-passage scores/s  "
          f"{args.passages / search_s:,.0f} passages/s  (best of {len(times)}: "
          f"{', '.join(f'{t:.3f}' for t in times)} s)")
    print(f"top-1 is the query's source passage for {hit_rate:.1%} of queries")


if __name__ == "__main__":
    main()
