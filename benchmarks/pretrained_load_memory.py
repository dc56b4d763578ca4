"""Peak host memory of a process loading a pretrained T5.1.1 encoder (INIT_CHECKPOINT): the
whole of it onto its own devices, or its half of a mesh whose 'model' axis spans two processes.

    python benchmarks/pretrained_load_memory.py [--size base] [--formats hf,t5x] [--repeats 3]

Writes a T5.1.1 encoder of random weights (float32) as a Hugging Face folder (config.json +
model.safetensors) and as a T5X checkpoint (zarr folders, chunks halving each axis), then for
each, in fresh processes on CPU:
  (a) whole: one process with 2 devices, mesh data=1 x model=2: it holds all the weights;
  (b) half: two processes (jax.distributed over gloo) with 1 device each, the same mesh: each
      holds half (the 'data_model' rules shard vocab, heads, mlp and joined_kv over 'model').
Each process runs what samtone-train runs for INIT_CHECKPOINT (`load_encoder_params`, then
`init_train_state`; an SDE, plain SGD so that no optimiser state adds up) with the lazy
loader (read by slice), and with `--loaders lazy,eager` also with the whole-array reads
(`hf.load_hf_t5_encoder` / `t5x.load_t5x_checkpoint` into a host tree, then placed).
Reported: peak RSS (VmHWM; ru_maxrss would count the parent's pages at the fork) above the
process's RSS once jax is imported, the job joined, a first computation compiled and the
model's shardings traced (that baseline, ~0.3 GB, is the same in every case and would hide the
differences), median and range over the repeats; for (b) the larger of the two processes. On
CPU the devices' memory is host memory, so the figures include the device buffers a process
holds: all the weights in (a), half in (b).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile

CASES = {"whole": (1, 2), "half": (2, 1)}  # (processes, devices per process)


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def _write_checkpoints(root: str, size: str, formats: list[str]) -> dict[str, str]:
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import safetensors.numpy
    from flax import traverse_util

    from samtone.checkpoints import hf
    from samtone.models import t5

    config = t5.t5_1_1_config(size)
    rng = np.random.default_rng(0)
    params = {path: rng.standard_normal(shape, np.float32)
              for path, shape in hf.encoder_shapes(config).items()}
    folders = {}
    if "hf" in formats:
        folders["hf"] = os.path.join(root, "hf")
        os.makedirs(folders["hf"])
        with open(os.path.join(folders["hf"], "config.json"), "w") as f:
            json.dump({"model_type": "t5", "vocab_size": config.vocab_size,
                       "d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff,
                       "num_layers": config.num_layers, "num_heads": config.num_heads,
                       "feed_forward_proj": config.feed_forward_proj}, f)
        safetensors.numpy.save_file(
            hf.to_hf_state_dict(traverse_util.unflatten_dict(params)),
            os.path.join(folders["hf"], "model.safetensors"))
    if "t5x" in formats:
        folders["t5x"] = _write_t5x(os.path.join(root, "t5x"), params)
    return folders


def _write_t5x(folder: str, params: dict) -> str:
    # pylint: disable=import-outside-toplevel
    import flax.serialization
    import tensorstore
    from flax import traverse_util

    target = {}
    for path, array in params.items():
        key = path if path[0] == "token_embedder" else ("encoder", *path)
        name = "target." + ".".join(key)
        metadata = {"shape": list(array.shape), "chunks": [-(-n // 2) for n in array.shape],
                    "dtype": "<f4", "compressor": {"id": "gzip", "level": 1}}
        tensorstore.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                        "path": os.path.join(folder, name)},
                          "metadata": metadata}, create=True).result().write(array).result()
        target[key] = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": name},
                       "metadata": metadata}
    contents = {"version": 3, "optimizer": {"target": traverse_util.unflatten_dict(target),
                                            "state": {}}}
    with open(os.path.join(folder, "checkpoint"), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(contents))
    return folder


def measure(args) -> dict:
    """One process's share of one load (the child process)."""
    # pylint: disable=import-outside-toplevel  (jax in the child process only)
    import jax
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", args.processes, args.process_id)
    import numpy as np
    import optax
    import safetensors  # noqa: F401  (imported by the readers; part of the baseline)
    import tensorstore  # noqa: F401

    from samtone import partitioning, train_step
    from samtone.checkpoints import hf, pretrained, t5x
    from samtone.models import dual_encoder, t5

    config = t5.t5_1_1_config(args.size, dropout_rate=0.0)
    model = dual_encoder.DualEncoder(config, "sde", projection_dim=config.d_model)
    mesh = partitioning.make_mesh((1, 2))
    rules = partitioning.logical_axis_rules("data_model")
    batch = {"query_tokens": np.zeros((2, 8), np.int32),
             "passage_tokens": np.zeros((2, 8), np.int32)}
    # The baseline: jax imported, the job joined, a first computation compiled and run, and
    # the model's shapes and shardings traced (samtone-train does all of it in any case).
    first = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    jax.block_until_ready(jax.jit(lambda: jax.numpy.zeros(2), out_shardings=first)())
    train_step.train_state_shardings(model, optax.sgd(0.0), batch, mesh, rules)
    baseline = _status_bytes("VmRSS")
    if args.loader == "lazy":
        init_params = pretrained.load_encoder_params(args.path, model)
    elif args.format == "hf":
        init_params = dual_encoder.tower_params(hf.load_hf_t5_encoder(args.path)[1], "sde")
    else:
        init_params = dual_encoder.tower_params(
            t5x.t5x_encoder_to_samtone(t5x.load_t5x_checkpoint(args.path)), "sde")
    state, _ = train_step.init_train_state(model, optax.sgd(0.0), batch, mesh, rules,
                                           init_params=init_params)
    jax.block_until_ready(state.params)
    held = sum(shard.data.nbytes for leaf in jax.tree.leaves(state.params["encoder"])
               for shard in leaf.addressable_shards)
    # Not ru_maxrss: Linux keeps in it the parent's resident pages of the fork before exec.
    peak = _status_bytes("VmHWM")
    return {"peak_above_baseline": peak - baseline, "baseline": baseline, "held": held}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_case(case: str, path: str, checkpoint_format: str, loader: str, size: str) -> dict:
    """The larger process's figures of one fresh run of `case`."""
    processes, devices = CASES[case]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = _free_port()
    children = [subprocess.Popen(
        [sys.executable, __file__, "--child", f"--path={path}", f"--format={checkpoint_format}",
         f"--loader={loader}", f"--size={size}", f"--processes={processes}",
         f"--process_id={i}", f"--port={port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(processes)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=1800)
        if child.returncode:
            raise RuntimeError(f"{case} {checkpoint_format} {loader} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return max(results, key=lambda result: result["peak_above_baseline"])


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"])
    parser.add_argument("--formats", default="hf,t5x", help="hf, t5x or both")
    parser.add_argument("--loaders", default="lazy", help="lazy (by slice), eager or both")
    parser.add_argument("--repeats", type=int, default=3)
    for name in ("path", "format", "loader", "processes", "process_id", "port"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.processes, args.process_id = int(args.processes), int(args.process_id)
        print(json.dumps(measure(args)))
        return
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}", flush=True)
    formats, loaders = args.formats.split(","), args.loaders.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        folders = _write_checkpoints(root, args.size, formats)
        for checkpoint_format in formats:
            for loader in loaders:
                figures = {case: [_run_case(case, folders[checkpoint_format],
                                            checkpoint_format, loader, args.size)
                                  for _ in range(args.repeats)] for case in CASES}
                rows.append((checkpoint_format, loader, figures))
                print(f"{checkpoint_format} {loader}: done", flush=True)
    print(f"\nT5.1.1-{args.size} encoder, float32; peak RSS above the RSS after imports, MiB: "
          f"median (min-max) of {args.repeats}; (b) the larger of its two processes\n")
    print("| checkpoint | loader | weights held (a) / (b) | (a) whole, 1 process "
          "| (b) half, 2 processes | ratio (b)/(a) |")
    print("|---|---|---|---|---|---|")
    for checkpoint_format, loader, figures in rows:
        cells, medians = [], {}
        for case in CASES:
            peaks = [result["peak_above_baseline"] for result in figures[case]]
            medians[case] = statistics.median(peaks)
            cells.append(f"{_mib(medians[case])} ({_mib(min(peaks))}-{_mib(max(peaks))})")
        held = " / ".join(_mib(figures[case][0]["held"]) for case in CASES)
        print(f"| {checkpoint_format} | {loader} | {held} | {cells[0]} | {cells[1]} "
              f"| {medians['half'] / medians['whole']:.2f}x |")


if __name__ == "__main__":
    main()
