"""samtone's train step against the PyTorch incumbent, side by side: pairs/s, tokens/s, MFU.

    python benchmarks/train_step.py --size=small --batch=32 --query_length=32 \
        --passage_length=128 --lengths=real --output=result.json

Both sides train the same T5.1.1 ADE-SPL dual encoder (two towers, mean pooling, one shared
bias-free projection) from the same initial parameters, on the same token ids, with the same
loss and an Adafactor optimiser:

  samtone    the real step (samtone.train_step.make_train_step): SamToNe on the query side,
             one way (`samtone_loss(bidirectional=False)`), T5 Adafactor; batches made by the
             pipeline's own functions (`--batching`: packed rows, length buckets, or padded
             to the maximum).
  incumbent  what a sentence-transformers user runs: two `transformers.T5EncoderModel`
             towers, mean pooling, a shared `torch.nn.Linear(bias=False)`,
             `MultipleNegativesRankingLoss(directions=("query_to_doc", "query_to_query"),
             partition_mode="joint", scale=1/temperature)` and `transformers.Adafactor`; each
             column padded to its batch's longest text, as sentence-transformers pads.

The two losses are the same function (tests/test_losses.py), so the first step's losses,
printed, agree: the same model, tokens and objective on both sides.

Lengths. `--lengths=full` fills every position. `--lengths=real` draws each text's length
from the token-length histogram of MS MARCO passage ranking below (REAL_LENGTHS), truncated
to --query_length / --passage_length.

Timing. After compilation and one warm-up pass, the sides alternate in `--rounds` rounds
(the side that goes first alternates too), each round running every one of `--batches`
distinct batches once, so machine noise hits both; the best round of each side is reported.
Rounds, not single steps: PyTorch's OpenMP threads keep spinning for a while after each step,
and alternating step by step charged that spin to samtone's next step (small, `real`: 3.57 s
a step alternating by steps, 2.87 s alone).
MFU is the model FLOPs of the real tokens (samtone.plan.texts_train_flops: padding is not
counted) per second over `--peak_tflops`, or on CPU over the float32 matmul throughput this
run measures with a large `jnp.dot`. Each side's minor page faults per step are counted too
(getrusage): fresh memory touched by a step, which `--no-keep_freed_memory` shows (see
samtone.host_memory). Prints numbers and the command; asserts nothing.
`--output` writes them as JSON, `--profile=DIR` also writes a jax.profiler trace of a few
samtone steps and prints the XLA operations that took the most time.

The incumbent needs the `test` extra (`pip install -e '.[test]'`: torch, transformers,
sentence-transformers); without it use `--no-incumbent`.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import resource
import shlex
import sys
import time

# Token lengths (EOS included) of MS MARCO passage ranking v1 under T5's SentencePiece
# vocabulary, as (lowest, highest, share of texts). Sources: Bajaj et al. 2016, "MS MARCO: A
# Human Generated MAchine Reading Comprehension Dataset" (arXiv:1611.09268): 1,010,916 Bing
# queries of about 6 words; the 8,841,823-passage collection of the passage ranking task
# (microsoft.github.io/msmarco/Datasets) averages about 56-60 words a passage. At about 1.3
# SentencePiece pieces per English word plus EOS, queries average ~9.5 tokens and passages
# ~79, with the long right tail of web passages. The shares below are modelled on those
# published figures (no corpus is downloaded here), then truncated to the configured lengths.
REAL_LENGTHS = {
    "query": ((3, 4, 0.05), (5, 6, 0.13), (7, 8, 0.23), (9, 10, 0.22), (11, 12, 0.15),
              (13, 16, 0.14), (17, 24, 0.07), (25, 40, 0.01)),
    "passage": ((12, 32, 0.03), (33, 48, 0.09), (49, 64, 0.19), (65, 80, 0.23),
                (81, 96, 0.19), (97, 112, 0.12), (113, 128, 0.07), (129, 192, 0.06),
                (193, 320, 0.02)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base", "large", "xl",
                                                           "xxl"])
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--query_length", type=int, default=32)
    parser.add_argument("--passage_length", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=0, help="hard negatives per example")
    parser.add_argument("--lengths", default="full", choices=["full", "real"],
                        help="full: every position filled; real: MS MARCO's length histogram")
    parser.add_argument("--batching", default="packed", choices=["packed", "buckets", "max"],
                        help="samtone's batches: packed rows (make_batch_iterator.pack), "
                             "length buckets (length_buckets), or padded to the maximum")
    parser.add_argument("--batches", type=int, default=4,
                        help="distinct batches, each run once per round (one shape each)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--incumbent", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the PyTorch incumbent (needs the `test` extra)")
    parser.add_argument("--xla_cpu_flags", action=argparse.BooleanOptionalAction, default=True,
                        help="samtone.xla_flags.CPU_FLAGS, as samtone-train sets them")
    parser.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="samtone.host_memory.keep_freed_memory(), as samtone-train "
                             "sets it (process-wide: both sides)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak for MFU (e.g. 989 for H100/H200 bf16 dense); "
                             "default: the float32 jnp.dot throughput measured here")
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--mesh", default="-1,1", help="data,model mesh shape; -1 = the rest")
    parser.add_argument("--rules", default="data", help="data | data_model | fsdp | fsdp_model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="activation dtype (parameters stay float32); the incumbent "
                             "uses torch.autocast to bfloat16 on GPU")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--microbatches", type=int, default=1,
                        help="samtone's cached-gradient sub-batches (train.microbatches)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fake_devices", type=int, default=0,
                        help="CPU only: pretend to have this many devices (XLA host platform)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    parser.add_argument("--profile", default=None,
                        help="write a jax.profiler trace of samtone's steps to this folder "
                             "and print the operations that took the most time")
    args = parser.parse_args(argv)
    for name in ("batch", "batches", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be at least 1")
    if args.batching == "packed" and args.microbatches > 1:
        parser.error("--microbatches needs --batching=buckets or max (packed rows mix examples)")
    return args


# ---------------------------------------------------------------------------------------------
# Batches: the same token ids for both sides.


def draw_lengths(rng, kind: str, count: int, max_length: int, lengths: str):
    import numpy as np  # pylint: disable=import-outside-toplevel
    if lengths == "full":
        return np.full(count, max_length, np.int64)
    bins = REAL_LENGTHS[kind]
    shares = np.array([share for _, _, share in bins])
    chosen = rng.choice(len(bins), size=count, p=shares / shares.sum())
    drawn = np.array([rng.integers(bins[i][0], bins[i][1] + 1) for i in chosen])
    return np.minimum(drawn, max_length)


def token_ids(rng, lengths, max_length: int, vocab_size: int):
    """int32 [len(lengths), max_length]: random pieces, EOS (1) last, then 0-padding."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    ids = rng.integers(3, vocab_size, size=(len(lengths), max_length))
    positions = np.arange(max_length)
    ids = np.where(positions == lengths[:, None] - 1, 1, ids)
    return np.where(positions < lengths[:, None], ids, 0).astype(np.int32)


def make_batches(args, vocab_size: int):
    """Global batches of one text per row, padded to the maximum lengths (numpy)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(args.seed)
    batches = []
    size, negatives = args.batch, args.negatives
    for _ in range(args.batches):
        query_lengths = draw_lengths(rng, "query", size, args.query_length, args.lengths)
        passage_lengths = draw_lengths(rng, "passage", size * (1 + negatives),
                                       args.passage_length, args.lengths)
        passages = token_ids(rng, passage_lengths, args.passage_length, vocab_size)
        batch = {"query_tokens": token_ids(rng, query_lengths, args.query_length, vocab_size),
                 "passage_tokens": passages[:size],
                 "query_ids": np.arange(size, dtype=np.int32),
                 "passage_ids": np.arange(size, dtype=np.int32)}
        if negatives:
            batch["negative_tokens"] = passages[size:].reshape(size, negatives, -1)
            batch["negative_ids"] = (size + np.arange(size * negatives, dtype=np.int32)
                                     ).reshape(size, negatives)
        batches.append(batch)
    return batches


def samtone_batch(batch, batching: str):
    """The batch as samtone's pipeline makes it (samtone.data.pipeline / packing)."""
    from samtone.data import packing, pipeline  # pylint: disable=import-outside-toplevel
    if batching == "packed":
        return pipeline.pack_batch(batch)
    if batching == "max":
        return batch
    lengths = packing.text_lengths
    longest_passage = int(lengths(batch["passage_tokens"]).max())
    if "negative_tokens" in batch:
        longest_passage = max(longest_passage, int(lengths(batch["negative_tokens"]).max()))
    return pipeline.cut_to_lengths(
        batch,
        packing.bucket_length(int(lengths(batch["query_tokens"]).max()),
                              packing.default_bucket_lengths(batch["query_tokens"].shape[1])),
        packing.bucket_length(longest_passage,
                              packing.default_bucket_lengths(batch["passage_tokens"].shape[1])))


def computed_tokens(batch) -> int:
    """Token positions the tower layers run on (padding included)."""
    return sum(batch[key].size for key in ("query_tokens", "passage_tokens", "negative_tokens")
               if key in batch)


# ---------------------------------------------------------------------------------------------
# The incumbent.


def incumbent_setup(args, config, params, projection_dim):
    """(train_step(batch) -> loss, computed tokens of a batch), from samtone's initial params."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from sentence_transformers.sentence_transformer.losses import (  # pylint: disable=import-outside-toplevel
        MultipleNegativesRankingLoss)

    from samtone.checkpoints import hf  # pylint: disable=import-outside-toplevel
    from samtone.models import t5  # pylint: disable=import-outside-toplevel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_config = hf.to_hf_config(config)

    def tower(encoder_params):
        model = transformers.T5EncoderModel(hf_config)
        state = {name: torch.from_numpy(value)
                 for name, value
                 in hf.to_hf_state_dict(t5.unstack_layer_params(encoder_params)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [name for name in missing if name != "encoder.embed_tokens.weight"]  # tied
        assert not missing and not unexpected, (missing, unexpected)
        return model

    class DualEncoder(torch.nn.Module):
        """ADE-SPL as sentence-transformers builds it: two towers, mean pooling, one Dense."""

        def __init__(self):
            super().__init__()
            self.query_encoder = tower(params["query_encoder"])
            self.passage_encoder = tower(params["passage_encoder"])
            self.projection = torch.nn.Linear(config.d_model, projection_dim, bias=False)
            with torch.no_grad():
                kernel = np.asarray(params["projection_layer"]["kernel"], np.float32)
                self.projection.weight.copy_(torch.from_numpy(kernel.T.copy()))

        def embed(self, encoder, ids):
            ids = torch.from_numpy(np.ascontiguousarray(ids)).to(device, torch.long)
            mask = ids != 0
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # sentence-transformers' Pooling
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return self.projection(pooled.float())

    model = DualEncoder().to(device).train()
    loss_fn = MultipleNegativesRankingLoss(
        model, scale=1.0 / args.temperature, directions=("query_to_doc", "query_to_query"),
        partition_mode="joint")
    optimizer = transformers.Adafactor(model.parameters(), lr=1e-3, scale_parameter=True,
                                       relative_step=False, warmup_init=False)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and args.dtype == "bfloat16" else None)

    def columns(batch):
        """Each column cut to its longest text, as sentence-transformers pads."""
        cols = [batch["query_tokens"], batch["passage_tokens"]]
        if "negative_tokens" in batch:
            cols += [batch["negative_tokens"][:, k]
                     for k in range(batch["negative_tokens"].shape[1])]
        return [c[:, :max(1, int(np.count_nonzero(c, axis=1).max()))] for c in cols]

    def step(batch):
        query, *documents = columns(batch)
        optimizer.zero_grad(set_to_none=True)
        with autocast if autocast is not None else _nullcontext():
            embeddings = [model.embed(model.query_encoder, query)]
            embeddings += [model.embed(model.passage_encoder, d) for d in documents]
            loss = loss_fn.compute_loss_from_embeddings(embeddings, labels=None)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, lambda batch: sum(c.size for c in columns(batch)), torch


class _nullcontext:  # pylint: disable=invalid-name
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Measurement helpers.


def matmul_flops_per_second(jax, jnp, n: int, repeats: int = 5) -> float:
    """float32 (or the default-precision) jnp.dot throughput of [n, n] x [n, n], best of repeats."""
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.dot(x, y))
    jax.block_until_ready(dot(a, a))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        best = min(best, time.perf_counter() - started)
    return 2.0 * n ** 3 / best


def print_profile(directory: str, steps: int, top: int = 20) -> list:
    """The XLA operations with the most time in a jax.profiler trace, per step."""
    import jax  # pylint: disable=import-outside-toplevel
    files = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    data = jax.profiler.ProfileData.from_file(files[-1])
    totals, counts = collections.Counter(), collections.Counter()
    skip = ("ThunkExecutor", "Await", "PjitFunction", "$")
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not event.name.startswith(skip):
                    totals[event.name] += event.duration_ns
                    counts[event.name] += 1
    rows = [(name, ns / 1e6 / steps, counts[name] // steps) for name, ns in totals.most_common(top)]
    print(f"profile ({files[-1]}): operations with the most time, ms per step, all threads")
    for name, ms, count in rows:
        print(f"  {ms:9.2f} ms  x{count:<4d} {name}")
    return rows


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fake_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.xla_cpu_flags:
        from samtone import xla_flags  # pylint: disable=import-outside-toplevel
        xla_flags.add_cpu_flags()
    if args.keep_freed_memory:
        from samtone import host_memory  # pylint: disable=import-outside-toplevel
        host_memory.keep_freed_memory()

    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from samtone import losses, optimizers, partitioning, plan  # pylint: disable=import-outside-toplevel
    from samtone import train_step as train_step_lib  # pylint: disable=import-outside-toplevel
    from samtone.data import packing  # pylint: disable=import-outside-toplevel
    from samtone.models import dual_encoder, t5  # pylint: disable=import-outside-toplevel

    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    print("command:", command)
    devices = jax.devices()
    platform_name = devices[0].platform
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({platform_name}), "
          f"jax {jax.__version__}, {os.cpu_count()} CPUs, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.incumbent:
        try:
            import sentence_transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
            import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
            import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError as error:
            print(f"error: the incumbent needs torch, transformers and sentence-transformers "
                  f"({error}); install them with `pip install -e '.[test]'`, or run with "
                  "--no-incumbent to time samtone alone", file=sys.stderr)
            return 2

    config = t5.t5_1_1_config(args.size, dtype=jnp.dtype(args.dtype), remat_policy=args.remat,
                              scan_layers=args.scan_layers, dropout_rate=args.dropout)
    model = dual_encoder.DualEncoder(config, "ade_spl", projection_dim=config.d_model)
    mesh = partitioning.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    rules = partitioning.logical_axis_rules(args.rules)
    loss = losses.samtone_loss
    loss_fn = train_step_lib.make_loss_fn(
        lambda q, p, **kw: loss(q, p, temperature=args.temperature, bidirectional=False, **kw),
        ("negatives", "query_ids", "passage_ids", "negative_ids"))

    batches = make_batches(args, config.vocab_size)
    shards = partitioning.batch_shards(mesh, rules)
    host_batches = [samtone_batch(b, args.batching) for b in batches]
    if args.batching == "packed":
        host_batches = [packing.pad_rows(b, shards) for b in host_batches]
    batch_shardings = partitioning.batch_shardings(host_batches[0], mesh, rules)
    device_batches = [jax.device_put(b, batch_shardings) for b in host_batches]

    optimizer = optimizers.make_optimizer(
        learning_rate=1e-3, total_steps=10 * args.batches * (args.rounds + 2),
        logical_axes=train_step_lib.param_logical_specs(model, batches[0], mesh, rules))
    state, state_shardings = train_step_lib.init_train_state(model, optimizer, batches[0], mesh,
                                                             rules, seed=args.seed)
    initial_params = jax.device_get(state.params)
    step = train_step_lib.make_train_step(model, optimizer, loss_fn, state_shardings,
                                          batch_shardings, mesh, rules,
                                          microbatches=args.microbatches)

    # Real tokens, computed tokens and model FLOPs, the same for both sides.
    def text_lengths(batch):
        """(query lengths, passage and hard negative lengths) of a batch."""
        passages = [packing.text_lengths(batch["passage_tokens"])]
        if "negative_tokens" in batch:
            passages.append(packing.text_lengths(batch["negative_tokens"]).ravel())
        return packing.text_lengths(batch["query_tokens"]), np.concatenate(passages)

    real_tokens = [int(sum(lengths.sum() for lengths in text_lengths(b))) for b in batches]
    flops = [plan.texts_train_flops(model, *text_lengths(b)) for b in batches]
    samtone_computed = [computed_tokens(b) for b in host_batches]
    shapes = sorted({tuple(v.shape for k, v in sorted(b.items()) if k.endswith("tokens"))
                     for b in host_batches})

    started = time.perf_counter()
    first_losses = {}
    for i, batch in enumerate(device_batches):  # one compilation per distinct shape
        state, metrics = step(state, batch)
        if i == 0:
            first_losses["samtone"] = float(metrics["loss"])
    jax.block_until_ready(state)
    compile_seconds = time.perf_counter() - started

    def run_samtone():
        nonlocal state
        for batch in device_batches:
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))

    sides = {"samtone": run_samtone}
    incumbent_computed = None
    if args.incumbent:
        incumbent_step, incumbent_tokens, torch = incumbent_setup(
            args, config, initial_params, config.d_model)
        for i, batch in enumerate(batches):  # warm-up (allocator, thread pools)
            value = incumbent_step(batch)
            if i == 0:
                first_losses["incumbent"] = float(value)
        incumbent_computed = [incumbent_tokens(b) for b in batches]
        sides["incumbent"] = lambda: [incumbent_step(b) for b in batches]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("first-step loss (same initial parameters and tokens): " +
          ", ".join(f"{side} {value:.5f}" for side, value in first_losses.items()))

    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    matmul_size = 2048 if platform_name == "cpu" else 8192
    matmul = matmul_flops_per_second(jax, jnp, matmul_size)

    run_samtone()  # warm-up round
    rounds = {side: [] for side in sides}
    page_faults = collections.Counter()  # minor faults: first touches of newly mapped memory
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            sides[side]()
            rounds[side].append(time.perf_counter() - started)
            page_faults[side] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    matmul = max(matmul, matmul_flops_per_second(jax, jnp, matmul_size))
    peak_source = (f"--peak_tflops={args.peak_tflops}" if peak else
                   f"jnp.dot float32 [{matmul_size}, {matmul_size}]^2 measured in this run")
    peak = peak or matmul

    steps_per_round = len(batches)
    pairs = args.batch * steps_per_round
    result = {
        "command": command,
        "settings": vars(args),
        "devices": f"{len(devices)} x {devices[0].device_kind} ({platform_name})",
        "cpus": os.cpu_count(),
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "num_params": int(sum(x.size for x in jax.tree.leaves(initial_params))),
        "samtone_shapes": [list(map(list, s)) for s in shapes],
        "compile_seconds": compile_seconds,
        "first_step_loss": first_losses,
        "matmul_flops_per_s": matmul,
        "peak_flops_per_s": peak,
        "peak_source": peak_source,
        "model_flops_per_step": float(np.mean(flops)),
        "real_tokens_per_step": float(np.mean(real_tokens)),
        "round_seconds": rounds,
    }
    for side, times in rounds.items():
        best = min(times)
        computed = samtone_computed if side == "samtone" else incumbent_computed
        result[f"{side}_step_seconds"] = best / steps_per_round
        result[f"{side}_pairs_per_s"] = pairs / best
        result[f"{side}_real_tokens_per_s"] = sum(real_tokens) / best
        result[f"{side}_computed_tokens_per_step"] = float(np.mean(computed))
        result[f"{side}_padding_fraction"] = 1.0 - sum(real_tokens) / sum(computed)
        result[f"{side}_mfu"] = sum(flops) / best / peak
        result[f"{side}_page_faults_per_step"] = page_faults[side] / (args.rounds * steps_per_round)
    result["padding_fraction"] = result["samtone_padding_fraction"]
    result["mfu"] = result["samtone_mfu"]
    if args.incumbent:
        result["ratio"] = result["samtone_pairs_per_s"] / result["incumbent_pairs_per_s"]

    print(f"model: T5.1.1-{args.size} ade_spl, {result['num_params'] / 1e6:.1f}M params, "
          f"activations {args.dtype}, remat {args.remat}, scan_layers {args.scan_layers}")
    print(f"batch {args.batch} (query {args.query_length}, passage {args.passage_length}, "
          f"{args.negatives} negatives), lengths {args.lengths}, samtone batching "
          f"{args.batching}, mesh {dict(mesh.shape)}, rules {args.rules!r}")
    print(f"samtone shapes {shapes}; compile + first steps {compile_seconds:.1f}s")
    print(f"model FLOPs/step {result['model_flops_per_step'] / 1e9:.1f} G on "
          f"{result['real_tokens_per_step']:.0f} real tokens; peak {peak / 1e9:.1f} GFLOP/s "
          f"({peak_source})")
    for side in rounds:
        print(f"{side:9s}: {result[f'{side}_pairs_per_s']:8.2f} pairs/s, "
              f"{result[f'{side}_step_seconds'] * 1000:8.1f} ms/step, "
              f"{result[f'{side}_real_tokens_per_s']:9.0f} real tokens/s, padding "
              f"{result[f'{side}_padding_fraction']:.1%}, MFU {result[f'{side}_mfu']:.1%}, "
              f"{result[f'{side}_page_faults_per_step']:,.0f} page faults/step "
              f"(rounds: {', '.join(f'{t:.2f}s' for t in rounds[side])})")
    if args.incumbent:
        print(f"ratio (samtone / incumbent pairs/s): {result['ratio']:.2f}x")

    if args.profile:
        profile_steps = len(device_batches)
        with jax.profiler.trace(args.profile):
            run_samtone()
        result["profile"] = print_profile(args.profile, profile_steps)
        hlo = os.path.join(args.profile, "train_step.hlo.txt")  # what the names above are
        with open(hlo, "w", encoding="utf-8") as file:
            file.write(step.lower(state, device_batches[0]).compile().as_text())
        print(f"the compiled step's HLO (operation names as above): {hlo}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2, default=str)
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
