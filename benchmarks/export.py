"""Export and load times of each samtone-export format for a randomly initialised model.

    python benchmarks/export.py --size small --arch ade_spl

Writes each format (jax, sentence_transformers, saved_model) into a temporary folder with
samtone.export.write_export (query length 64, passage length 256), then times
samtone.inference.Encoder.load on the folder plus encoding 64 queries (compilation
included). The first sentence_transformers and saved_model exports include importing torch /
TensorFlow. Prints numbers only; it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

FORMATS = ("jax", "sentence_transformers", "saved_model")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base", "large",
                                                            "xl", "xxl"])
    parser.add_argument("--arch", default="ade_spl", choices=["sde", "ade", "ade_spl"])
    parser.add_argument("--formats", default=",".join(FORMATS))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # pylint: disable=import-outside-toplevel
    import jax
    import jax.numpy as jnp

    from samtone import export, inference
    from samtone.data import smoke_path
    from samtone.models import dual_encoder, t5

    model = dual_encoder.DualEncoder(t5.t5_1_1_config(args.size, dropout_rate=0.0),
                                     architecture=args.arch, projection_dim=768)
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, 64), jnp.int32),
                                        jnp.ones((1, 256), jnp.int32))["params"])()
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"{args.size} {args.arch}: {count / 1e6:.1f}M parameters, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)")
    queries = ["what is samtone?"] * 64
    with tempfile.TemporaryDirectory() as root:
        for export_format in args.formats.split(","):
            folder = os.path.join(root, export_format)
            start = time.perf_counter()
            export.write_export(folder, format=export_format, model=model, params=params,
                                vocabulary=smoke_path("spm.model"), query_length=64,
                                passage_length=256, step=0)
            written = time.perf_counter() - start
            size = sum(os.path.getsize(os.path.join(path, name))
                       for path, _, names in os.walk(folder) for name in names)
            start = time.perf_counter()
            inference.Encoder.load(folder, batch_size=32).encode_queries(queries)
            print(f"{export_format:>22}: export {written:5.1f} s, {size / 2**20:7.1f} MiB; "
                  f"Encoder.load + 64 queries {time.perf_counter() - start:5.1f} s", flush=True)


if __name__ == "__main__":
    main()
