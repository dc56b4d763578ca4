"""Time of each stage of full-corpus evaluation: encoding, search on the mesh, metrics.

    python benchmarks/retrieval.py --mode beir --passages 20000 --queries 1000 --size tiny
    python benchmarks/retrieval.py --mode vectors --passages 100000 --queries 1000 --dim 768

`--mode beir` (default) builds a synthetic BEIR folder (corpus.jsonl, queries.jsonl,
qrels/test.tsv; passages of 8 to 200 words, lognormal, from the smoke data's words; each
query a few words of its one relevant passage) and runs what samtone-eval runs on it with a
randomly initialised T5.1.1 dual encoder of `--size` (so the metrics are those of chance):
read the folder, encode the corpus in length buckets into a PassageIndex (passages/s),
encode the queries (queries/s), exact top-k search, trec_eval's metrics, write run.trec.
Compilation is done by a warm-up first and reported apart. `--compare_buckets` also encodes
the corpus padded to the full passage length, the cost buckets avoid.

`--mode vectors` times search and metrics alone on random unit vectors ([N, dim]; each
query a noisy copy of one passage, its relevant one), at sizes where encoding would take
hours on a CPU.

Prints numbers and the command; asserts nothing. Runs on the real devices (one CPU device on
a CPU host) unless `--fake_devices` asks for more.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="beir", choices=["beir", "vectors"])
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=100, help="run depth (top k per query)")
    parser.add_argument("--approximate", action="store_true", help="jax.lax.approx_max_k")
    parser.add_argument("--recall_target", type=float, default=0.95)
    parser.add_argument("--mesh", default="-1,1", help="data,model mesh shape; -1 = the rest")
    parser.add_argument("--fake_devices", type=int, default=0,
                        help="CPU only: pretend to have this many devices (XLA host platform)")
    beir = parser.add_argument_group("--mode beir")
    beir.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    beir.add_argument("--projection_dim", type=int, default=768)
    beir.add_argument("--query_length", type=int, default=64)
    beir.add_argument("--passage_length", type=int, default=256)
    beir.add_argument("--batch_size", type=int, default=128)
    beir.add_argument("--compare_buckets", action="store_true",
                      help="also encode the corpus without length buckets")
    vectors = parser.add_argument_group("--mode vectors")
    vectors.add_argument("--dim", type=int, default=768)
    vectors.add_argument("--repeats", type=int, default=3, help="timed searches after the first")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fake_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # pylint: disable=import-outside-toplevel

    print("command:", shlex.join([sys.executable, *sys.argv]))
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
          f"jax {jax.__version__}, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    (beir_benchmark if args.mode == "beir" else vectors_benchmark)(args)


def _stage(name: str, seconds: float, detail: str = "") -> None:
    print(f"{name:<16}{seconds:9.3f} s  {detail}")


# --- a synthetic BEIR folder through samtone-eval's stages -----------------------------------


def write_synthetic_beir(folder: str, num_passages: int, num_queries: int, seed: int = 0):
    import numpy as np  # pylint: disable=import-outside-toplevel
    from samtone.data import smoke_path  # pylint: disable=import-outside-toplevel
    with open(smoke_path("train.jsonl"), encoding="utf-8") as f:
        words = sorted({w for line in f for w in json.loads(line)["passage"].split()})
    rng = np.random.default_rng(seed)
    # About 2.5 tokens per word with the smoke vocabulary: a median of ~75 tokens, like MS
    # MARCO passages in T5's.
    lengths = np.clip(rng.lognormal(np.log(30), 0.6, num_passages), 5, 200).astype(int)
    os.makedirs(os.path.join(folder, "qrels"), exist_ok=True)
    passages = []
    with open(os.path.join(folder, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for j, length in enumerate(lengths):
            passages.append(rng.choice(len(words), length))
            f.write(json.dumps({"_id": f"doc{j}", "title": "",
                                "text": " ".join(words[w] for w in passages[-1])}) + "\n")
    relevant = rng.integers(0, num_passages, num_queries)
    with open(os.path.join(folder, "queries.jsonl"), "w", encoding="utf-8") as f:
        for i, passage in enumerate(relevant):
            picked = rng.choice(passages[passage], min(8, len(passages[passage])), replace=False)
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(words[w] for w in picked)})
                    + "\n")
    with open(os.path.join(folder, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{i}\tdoc{passage}\t1\n" for i, passage in enumerate(relevant))


def random_encoder(args, mesh, length_buckets=True):
    """An inference.Encoder of a randomly initialised dual encoder, sharded like serving."""
    # pylint: disable=import-outside-toplevel
    import flax.linen as nn
    import jax
    from samtone import inference, partitioning
    from samtone.data import smoke_path
    from samtone.data.tokenizer import Tokenizer
    from samtone.models import dual_encoder, t5
    overrides = {"vocab_size": 1000} if args.size == "tiny" else {}
    model = dual_encoder.DualEncoder(t5.t5_1_1_config(args.size, dropout_rate=0.0, **overrides),
                                     architecture="ade_spl", projection_dim=args.projection_dim)
    rules = partitioning.logical_axis_rules("data")
    init = partitioning.params_initializer(model, mesh, rules, [(1, 8), (1, 8)],
                                           jax.random.PRNGKey(0))
    shardings = partitioning.tree_shardings(jax.eval_shape(init), mesh, rules)
    params = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
    tokens = inference.token_sharding(mesh, rules, args.batch_size)

    def bound(method):
        encode = inference.tower_encoder(model, method, shardings, tokens, mesh, rules)
        return lambda token_ids: encode(params, token_ids)

    return inference.Encoder(bound("encode_queries"), bound("encode_passages"),
                             Tokenizer(smoke_path("spm.model")), args.query_length,
                             args.passage_length, 0, args.batch_size, length_buckets)


def warm_up(encode_fn, batch_size, max_length, lengths=None):
    """Compiles `encode_fn` at every bucket length (and max_length)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from samtone import encoding  # pylint: disable=import-outside-toplevel
    lengths = encoding.default_bucket_lengths(max_length) if lengths is None else lengths
    for length in {*lengths, max_length}:
        np.asarray(encode_fn(np.ones((batch_size, length), np.int32)))


def beir_benchmark(args):
    # pylint: disable=import-outside-toplevel
    import numpy as np
    from samtone import encoding, evaluate, partitioning
    from samtone.data import retrieval

    mesh = partitioning.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    print(f"synthetic BEIR: {args.passages} passages, {args.queries} queries; random T5.1.1 "
          f"{args.size} ADE-SPL, {args.projection_dim}-d; lengths {args.query_length} / "
          f"{args.passage_length}, batch {args.batch_size}, top {args.k}")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        write_synthetic_beir(folder, args.passages, args.queries)
        _stage("write folder", time.perf_counter() - started)
        started = time.perf_counter()
        data = retrieval.read_beir(folder, "test")
        _stage("read folder", time.perf_counter() - started,
               f"{len(data.passages) / (time.perf_counter() - started):,.0f} passages/s")

        encoder = random_encoder(args, mesh)
        started = time.perf_counter()  # one batch per bucket length: every shape compiled
        warm_up(encoder.passage_encoder, args.batch_size, args.passage_length)
        warm_up(encoder.query_encoder, args.batch_size, args.query_length)
        _stage("compile", time.perf_counter() - started, "(each tower at lengths "
               f"{encoding.default_bucket_lengths(args.passage_length)}, warm-up)")
        tokens = encoder.tokenizer.encode(data.passages, args.passage_length)
        real = (tokens != 0).sum(axis=1)
        print(f"{'':<16}passage tokens: mean {real.mean():.0f}, max {real.max()}; "
              f"{np.mean(real > args.passage_length - 1):.1%} truncated")

        result = evaluate.evaluate_retrieval(encoder, data, top_k=args.k, mesh=mesh,
                                             approximate=args.approximate,
                                             recall_target=args.recall_target, progress=False)
        seconds = result.seconds
        _stage("encode passages", seconds["encode_passages"],
               f"{len(data.passages) / seconds['encode_passages']:12,.0f} passages/s "
               "(length buckets, into the sharded index)")
        _stage("encode queries", seconds["encode_queries"],
               f"{len(data.queries) / seconds['encode_queries']:12,.0f} queries/s")
        _stage("search", seconds["search"],
               f"{len(data.queries) / seconds['search']:12,.0f} queries/s "
               f"({'approximate' if args.approximate else 'exact'} top {args.k})")
        _stage("metrics", seconds["metrics"], "(trec_eval order, 6 metrics)")
        started = time.perf_counter()
        evaluate.write_run(os.path.join(folder, "run.trec"), data, result)
        _stage("write run.trec", time.perf_counter() - started)
        share = (seconds["search"] + seconds["metrics"]) / sum(seconds.values())
        print(f"search + metrics: {share:.1%} of encode + search + metrics")
        print("metrics (random model):", json.dumps({k: round(v, 4)
                                                     for k, v in result.metrics.items()}))
        if args.compare_buckets:
            padded = random_encoder(args, mesh, length_buckets=False)
            warm_up(padded.passage_encoder, args.batch_size, args.passage_length, [])
            started = time.perf_counter()
            padded.encode_passages(data.passages, progress=False)
            elapsed = time.perf_counter() - started
            _stage("no buckets", elapsed,
                   f"{len(data.passages) / elapsed:12,.0f} passages/s (all padded to "
                   f"{args.passage_length}): buckets are "
                   f"{elapsed / seconds['encode_passages']:.1f}x faster")


# --- search and metrics alone, on random vectors --------------------------------------------


def vectors_benchmark(args):
    # pylint: disable=import-outside-toplevel
    import numpy as np
    from samtone import metrics, partitioning, search

    mode = f"approximate (recall_target={args.recall_target})" if args.approximate else "exact"
    print(f"corpus {args.passages} x {args.dim}, {args.queries} queries, k={args.k}, {mode}")
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    passages = rng.standard_normal((args.passages, args.dim), dtype=np.float32)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    relevant = rng.integers(0, args.passages, args.queries)
    queries = passages[relevant] + rng.standard_normal((args.queries, args.dim),
                                                       dtype=np.float32) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _stage("data", time.perf_counter() - started, "(random unit vectors, host)")

    mesh = partitioning.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    started = time.perf_counter()
    index = search.PassageIndex.from_embeddings(passages, mesh)
    index.embeddings.block_until_ready()
    elapsed = time.perf_counter() - started
    _stage("build index", elapsed, f"{args.passages / elapsed:12,.0f} passages/s "
           f"(host -> {len(mesh.devices.flat)} device(s), {index.embeddings.sharding.spec})")

    def run():
        begin = time.perf_counter()
        result = index.search(queries, args.k, approximate=args.approximate,
                              recall_target=args.recall_target, progress=False)
        return result, time.perf_counter() - begin  # results are numpy: already waited for

    (scores, indices), first = run()
    _stage("first search", first, "(with compilation)")
    times = [run()[1] for _ in range(args.repeats)]
    best = min(times) if times else first
    _stage("search", best, f"{args.queries / best:12,.0f} queries/s  "
           f"{args.passages * args.queries / best:,.3g} scores/s  (best of {len(times)}: "
           f"{', '.join(f'{t:.3f}' for t in times)} s)")
    started = time.perf_counter()
    ids = [f"doc{j}" for j in range(args.passages)]
    qrels = metrics.Qrels(np.arange(args.queries), relevant, np.ones(args.queries))
    scores, indices = metrics.trec_order(scores, indices, metrics.id_order(ids))
    values = metrics.retrieval_metrics(indices, qrels)
    _stage("metrics", time.perf_counter() - started, "(trec_eval order incl. sorting "
           f"{args.passages} ids, 6 metrics): P@1 {values['P@1']:.3f}")


if __name__ == "__main__":
    main()
