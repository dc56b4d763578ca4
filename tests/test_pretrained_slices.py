"""A pretrained checkpoint is read by slice straight into the train state's shardings: the
arrays equal the eager load's, every stored element is read once (ADE's two towers and the
replicas of a mesh axis included), and a process reads only the shards its devices hold."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import optax
import pytest

from samtone import partitioning
from samtone import train_step as train_step_lib
from samtone.checkpoints import hf, lazy, pretrained, t5x
from samtone.models import dual_encoder, t5

pytest.importorskip("tensorstore")
import tiny_checkpoints  # noqa: E402  (needs tensorstore)
from compile_flags import with_devices  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = t5.t5_1_1_config("tiny", dropout_rate=0.0)
BATCH = {"query_tokens": np.zeros((8, 8), np.int32), "passage_tokens": np.zeros((8, 16), np.int32)}
# hf: one float32 file; hf_sharded: bfloat16 tensors in two files and an index; t5x: zarr.
SOURCES = ("hf", "hf_sharded", "t5x")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{source: (folder, the arrays as stored, float32)}."""
    folder = tmp_path_factory.mktemp("pretrained")
    params = tiny_checkpoints.random_encoder(CONFIG, seed=3)
    return {
        "hf": (tiny_checkpoints.write_hf(folder / "hf", CONFIG, params), params),
        "hf_sharded": (tiny_checkpoints.write_hf(folder / "hf_sharded", CONFIG, params, files=2,
                                                 dtype=ml_dtypes.bfloat16),
                       tiny_checkpoints.as_stored(params, ml_dtypes.bfloat16)),
        "t5x": (tiny_checkpoints.write_t5x(folder / "t5x", params), params),
    }


def _eager_encoder(source, folder):
    if source == "t5x":
        return jax.tree.map(np.asarray, t5x.t5x_encoder_to_samtone(t5x.load_t5x_checkpoint(folder)))
    return hf.load_hf_t5_encoder(folder)[1]


def _record_reads(monkeypatch):
    """[(stored tensor, index)] of every read of a checkpoint array from now on."""
    reads = []
    hf_read, t5x_read = hf._WeightFiles.read, t5x.StoredArray._read  # pylint: disable=protected-access

    def read_hf(self, name, index=()):
        reads.append((name, index))
        return hf_read(self, name, index)

    def read_t5x(self, index):
        reads.append((self.where, index))
        return t5x_read(self, index)

    monkeypatch.setattr(hf._WeightFiles, "read", read_hf)  # pylint: disable=protected-access
    monkeypatch.setattr(t5x.StoredArray, "_read", read_t5x)
    return reads


def _size(index) -> int:
    return int(np.prod([axis.stop - axis.start for axis in index]))


@pytest.mark.parametrize("architecture", ["sde", "ade"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan_layers"])
@pytest.mark.parametrize("source", SOURCES)
def test_sliced_load_equals_the_eager_load_and_reads_each_element_once(
        checkpoints, monkeypatch, source, scan_layers, architecture):
    folder, stored = checkpoints[source]
    eager = _eager_encoder(source, folder)
    jax.tree.map(np.testing.assert_array_equal, eager, stored)
    model = dual_encoder.DualEncoder(t5.t5_1_1_config("tiny", dropout_rate=0.0,
                                                      scan_layers=scan_layers),
                                     architecture, projection_dim=16)
    mesh = partitioning.make_mesh((2, 4))  # embed over 'data', heads/mlp/vocab over 'model'
    reads = _record_reads(monkeypatch)

    init_params = pretrained.load_encoder_params(folder, model)
    assert not reads  # nothing is read before it is placed
    for path, leaf in jax.tree_util.tree_leaves_with_path(init_params):
        inline = source == "t5x" and path[-1].key == "scale"  # in the msgpack file
        assert isinstance(leaf, np.ndarray if inline else lazy.LazyArray), path
    state, _ = train_step_lib.init_train_state(model, optax.sgd(0.0), BATCH, mesh,
                                               partitioning.logical_axis_rules("fsdp_model"),
                                               init_params=init_params)

    expected = t5.stack_layer_params(eager, CONFIG.num_layers) if scan_layers else eager
    towers = ["encoder"] if architecture == "sde" else ["query_encoder", "passage_encoder"]
    for tower in towers:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params[tower]), expected)
    if architecture == "ade":  # each tower its own buffers: the train step donates them
        for query, passage in zip(jax.tree.leaves(state.params["query_encoder"]),
                                  jax.tree.leaves(state.params["passage_encoder"])):
            assert (query.addressable_shards[0].data.unsafe_buffer_pointer()
                    != passage.addressable_shards[0].data.unsafe_buffer_pointer())
    # Every stored element read once: no slice twice, and the slices of a tensor add up to it.
    assert len(reads) == len(set(map(repr, reads)))
    elements = {}
    for name, index in reads:
        elements[name] = elements.get(name, 0) + _size(index)
    assert elements == _stored_sizes(source, folder)


def _stored_sizes(source, folder) -> dict:
    """{tensor: its number of elements} of the arrays a checkpoint stores apart."""
    if source == "t5x":
        return {leaf.where: int(np.prod(leaf.shape))
                for leaf in jax.tree.leaves(t5x.open_t5x_checkpoint(folder))
                if isinstance(leaf, t5x.StoredArray)}
    sizes = {}
    for path, shape in hf.encoder_shapes(CONFIG).items():
        name = hf.hf_tensor_name(path)[0]
        sizes["shared.weight" if isinstance(name, tuple) else name] = int(np.prod(shape))
    return sizes


def test_lazy_layouts_read_the_slices_numpy_gives():
    """Transpose (Hugging Face Linear weights), stack (scan_layers) and index (unstack)."""
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((6, 4), np.float32) for _ in range(3)]
    transposed = [lazy.as_lazy(layer).T for layer in layers]
    stacked = np.stack(transposed)
    assert isinstance(stacked, lazy.LazyArray) and np.shape(stacked) == (3, 4, 6)
    reference = np.stack([layer.T for layer in layers])
    for index in [None, (slice(1, 3),), (slice(0, 3), slice(1, 3), slice(2, 5)),
                  (slice(None), slice(3, 4), slice(5, 6)), (slice(2, 2),)]:
        np.testing.assert_array_equal(stacked.read(index), reference[index or ()])
    np.testing.assert_array_equal(stacked[1].read((slice(1, 3),)), layers[1].T[1:3])
    np.testing.assert_array_equal(np.asarray(stacked), reference)
    with pytest.raises(TypeError):
        np.sum(stacked)  # reading it whole is said, never done in passing
    with pytest.raises(ValueError, match="contiguous"):
        stacked.read((slice(0, 3, 2),))


def test_placing_reads_each_slice_once_per_process():
    """make_array_from_callback asks once per device; replicas are read once."""
    mesh = partitioning.make_mesh((2, 4))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    array = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    reads = []
    stored = lazy.Sliced(array.shape, array.dtype,
                         lambda index: reads.append(index) or array[index])
    placed = lazy.place(stored, sharding, np.float32)
    np.testing.assert_array_equal(np.asarray(placed), array)
    assert len(reads) == 4  # the 4 'model' columns blocks, not the 8 devices
    assert sorted(index[1].start for index in reads) == [0, 2, 4, 6]


# --- two processes, the 'model' axis across them ---------------------------------------------

_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    import optax
    sys.path.insert(0, sys.argv[5])
    import tiny_checkpoints
    from samtone import partitioning, train_step
    from samtone.checkpoints import hf, pretrained, t5x
    from samtone.models import dual_encoder, t5

    process_id, port, sources, out = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), \\
        sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", 2, process_id)
    bytes_read = [0]
    hf_read, t5x_read = hf._WeightFiles.read, t5x.StoredArray._read
    def count(array):
        bytes_read[0] += array.nbytes
        return array
    hf._WeightFiles.read = lambda self, name, index=(): count(hf_read(self, name, index))
    t5x.StoredArray._read = lambda self, index: count(t5x_read(self, index))

    mesh = partitioning.make_mesh((1, 4))  # 2 devices here, 2 in the other process
    rules = partitioning.logical_axis_rules("data_model")
    batch = {"query_tokens": np.zeros((4, 8), np.int32),
             "passage_tokens": np.zeros((4, 16), np.int32)}
    config = t5.t5_1_1_config("tiny", dropout_rate=0.0)
    expected = tiny_checkpoints.random_encoder(config, seed=3)
    report = {}
    for source, folder, architecture, scan_layers in sources:
        model = dual_encoder.DualEncoder(t5.t5_1_1_config("tiny", dropout_rate=0.0,
                                                          scan_layers=scan_layers),
                                         architecture, projection_dim=16)
        bytes_read[0] = 0
        state, _ = train_step.init_train_state(
            model, optax.sgd(0.0), batch, mesh, rules,
            init_params=pretrained.load_encoder_params(folder, model))
        tower = state.params["encoder" if architecture == "sde" else "query_encoder"]
        want = t5.stack_layer_params(expected, 2) if scan_layers else expected
        same, shards_bytes = True, 0
        for (path, placed), array in zip(jax.tree_util.tree_leaves_with_path(tower),
                                         jax.tree.leaves(want)):
            same &= all(np.array_equal(s.data, array[s.index]) for s in placed.addressable_shards)
            if source == "t5x" and path[-1].key == "scale":
                continue  # inline in the msgpack file, not read from a zarr folder
            indices = {repr(s.index): s.index for s in placed.addressable_shards}.values()
            shards_bytes += sum(array[index].nbytes for index in indices)
        total = sum(array.nbytes for array in jax.tree.leaves(expected))
        report[source] = {"read": bytes_read[0], "shards": shards_bytes, "total": total,
                          "same": bool(same)}
    json.dump(report, open(out, "w"))
    """)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_each_of_two_processes_reads_only_its_half(checkpoints, tmp_path):
    """The 'model' axis spans both processes: each reads the bytes of its own shards (about
    half, the small replicated layer norms whole) and gets exactly the stored values."""
    sources = [["hf", str(checkpoints["hf"][0]), "sde", False],
               ["t5x", str(checkpoints["t5x"][0]), "ade", True]]
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices(2),
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    port = str(_free_port())
    processes = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(i), port, json.dumps(sources),
         str(tmp_path / f"{i}.json"), str(REPO / "tests")], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs):
        if process.returncode and "gloo" in output.lower() and "not" in output.lower() \
                and "available" in output.lower():
            pytest.skip(f"gloo CPU collectives are not available in this jaxlib: {output[-500:]}")
        assert process.returncode == 0, output[-4000:]

    for i in range(2):
        report = json.loads((tmp_path / f"{i}.json").read_text())
        for source, numbers in report.items():
            assert numbers["same"], (i, source)
            assert numbers["read"] == numbers["shards"], (i, source, numbers)
            assert numbers["read"] < 0.55 * numbers["total"], (i, source, numbers)
