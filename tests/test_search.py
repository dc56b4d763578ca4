"""samtone.search against a numpy brute force, on one device and on meshes of 8 fake devices.

Embeddings hold small integers, so every dot product is exact in float32 whatever the
summation order, and exact ties are common: the device result must then equal the brute
force (ties by lower corpus index) exactly, not just approximately.
"""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from samtone import partitioning, search
from compile_flags import with_devices

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PASSAGES = 37  # not a multiple of 8, 4 or 2: the last shard is padded
DIM = 6

# (mesh shape, axis splitting the corpus rows); the rest of the mesh splits the queries.
MESHES = {
    "1x1": ((1, 1), None),
    "8x1": ((8, 1), None),
    "4x2": ((4, 2), None),
    "4x2_rows_data": ((4, 2), "data"),
    "4x2_rows_model": ((4, 2), "model"),
}


def make_mesh(shape):
    return partitioning.make_mesh(shape, devices=jax.devices()[:shape[0] * shape[1]])


def integer_embeddings(rng, rows, dim=DIM):
    return rng.integers(-2, 3, size=(rows, dim)).astype(np.float32)


def brute_force(queries, passages, k, exclude=None, max_scores=None):
    """Top k by descending score, ties by lower index; -inf / -1 where fewer qualify."""
    scores = queries.astype(np.float64) @ passages.astype(np.float64).T
    top_scores = np.full((len(queries), k), -np.inf)
    top_indices = np.full((len(queries), k), -1)
    for i, row in enumerate(scores):
        allowed = np.ones(len(passages), bool)
        if exclude is not None:
            allowed[list(exclude[i])] = False
        if max_scores is not None:
            allowed &= row <= max_scores[i]
        candidates = np.flatnonzero(allowed)
        best = candidates[np.lexsort((candidates, -row[candidates]))][:k]
        top_scores[i, :len(best)] = row[best]
        top_indices[i, :len(best)] = best
    return top_scores, top_indices


def assert_same(result, expected):
    scores, indices = result
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected[1])
    np.testing.assert_array_equal(scores, expected[0].astype(np.float32))


# k=7 > the 5 rows of a shard of 8; k=40 > the corpus; rows_per_block=2: a shard scans
# its rows in several blocks, keeping a running top k.
@pytest.mark.parametrize("k, rows_per_block", [(1, None), (7, None), (40, None), (7, 2)])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_search_matches_brute_force(mesh_name, k, rows_per_block, monkeypatch):
    if rows_per_block:
        monkeypatch.setattr(search, "MAX_ROWS_PER_BLOCK", rows_per_block)
    shape, axis = MESHES[mesh_name]
    rng = np.random.default_rng(0)
    passages, queries = integer_embeddings(rng, NUM_PASSAGES), integer_embeddings(rng, 13)
    index = search.PassageIndex.from_embeddings(passages, make_mesh(shape), axis=axis)
    assert index.num_passages == NUM_PASSAGES and index.dim == DIM
    assert_same(index.search(queries, k), brute_force(queries, passages, k))


@pytest.mark.parametrize("mesh_name", ["1x1", "8x1", "4x2_rows_data"])
def test_exclude_and_max_scores_match_brute_force(mesh_name, monkeypatch):
    monkeypatch.setattr(search, "MAX_ROWS_PER_BLOCK", 3)
    shape, axis = MESHES[mesh_name]
    rng = np.random.default_rng(1)
    passages, queries = integer_embeddings(rng, NUM_PASSAGES), integer_embeddings(rng, 9)
    exclude = [set(rng.choice(NUM_PASSAGES, size=n, replace=False).tolist())
               for n in [0, 1, 3, 0, 12, 2, 5, 1, 30]]  # the last leaves 7 passages
    max_scores = rng.integers(-1, 4, size=len(queries)).astype(np.float32)
    max_scores[0] = np.inf
    index = search.PassageIndex.from_embeddings(passages, make_mesh(shape), axis=axis)
    k = 5
    assert_same(index.search(queries, k, exclude=exclude),
                brute_force(queries, passages, k, exclude=exclude))
    assert_same(index.search(queries, k, exclude=exclude, max_scores=max_scores),
                brute_force(queries, passages, k, exclude=exclude, max_scores=max_scores))


@pytest.mark.parametrize("mesh_name", ["1x1", "4x2_rows_data"])
def test_chunks_compile_once_and_match_one_chunk(mesh_name):
    shape, axis = MESHES[mesh_name]
    rng = np.random.default_rng(2)
    passages, queries = integer_embeddings(rng, NUM_PASSAGES), integer_embeddings(rng, 23)
    index = search.PassageIndex.from_embeddings(passages, make_mesh(shape), axis=axis)
    chunked = index.search(queries, 4, chunk_size=4, progress=False)  # 6 chunks, last padded
    assert [fn._cache_size() for fn in index._search_fns.values()] == [1]
    assert_same(chunked, brute_force(queries, passages, 4))
    assert_same(index.search(queries, 4, chunk_size=24), chunked)


def test_device_memory_is_bounded_by_chunk_and_block(monkeypatch):
    # 8192 x 32 float32 = 1 MiB of corpus, scanned in blocks of 256 rows by chunks of 16
    # queries: the temporaries are about 16 x 256 scores, never a copy of the corpus.
    monkeypatch.setattr(search, "MAX_ROWS_PER_BLOCK", 256)
    index = search.PassageIndex.from_embeddings(np.ones((8192, 32), np.float32),
                                                make_mesh((1, 1)))
    queries = np.ones((16, 32), np.float32)
    compiled = index._search_fn(10, False, 0.95).lower(
        index.embeddings, index._put(queries, 0, 16),
        index._put(np.ones(16, np.float32), 0, 16)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 8192 * 32 * 4 // 8


def test_no_queries():
    index = search.PassageIndex.from_embeddings(np.ones((5, DIM), np.float32), make_mesh((1, 1)))
    scores, indices = index.search(np.zeros((0, DIM), np.float32), 3)
    assert scores.shape == indices.shape == (0, 3)


def test_padding_rows_are_never_returned():
    # 3 passages over 8 shards: shards 3..7 hold only padding rows (zeros). An all-zero
    # query scores every row 0, so only the -inf mask keeps the padding out.
    passages = np.eye(3, DIM, dtype=np.float32)
    index = search.PassageIndex.from_embeddings(passages, make_mesh((8, 1)))
    scores, indices = index.search(np.zeros((2, DIM), np.float32), 5)
    np.testing.assert_array_equal(indices, [[0, 1, 2, -1, -1]] * 2)
    np.testing.assert_array_equal(scores, [[0, 0, 0, -np.inf, -np.inf]] * 2)


@pytest.mark.parametrize("mesh_name", ["1x1", "8x1", "4x2_rows_model"])
def test_from_chunks_equals_from_embeddings(mesh_name):
    shape, axis = MESHES[mesh_name]
    mesh = make_mesh(shape)
    passages = integer_embeddings(np.random.default_rng(3), NUM_PASSAGES)
    assert search.local_row_ranges(NUM_PASSAGES, mesh, axis=axis) == [(0, NUM_PASSAGES)]
    bounds = [0, 1, 2, 11, 11, 30, NUM_PASSAGES]  # uneven, with an empty chunk
    chunks = (passages[a:b] for a, b in zip(bounds, bounds[1:]))
    streamed = search.PassageIndex.from_chunks(chunks, NUM_PASSAGES, mesh, axis=axis)
    whole = search.PassageIndex.from_embeddings(passages, mesh, axis=axis)
    assert streamed.embeddings.sharding == whole.embeddings.sharding
    np.testing.assert_array_equal(np.asarray(streamed.embeddings), np.asarray(whole.embeddings))
    np.testing.assert_array_equal(np.asarray(whole.embeddings)[:NUM_PASSAGES], passages)
    num_shards = mesh.size if axis is None else mesh.shape[axis]
    for shard in whole.embeddings.addressable_shards:  # each device holds its rows only
        assert shard.data.shape == (-(-NUM_PASSAGES // num_shards), DIM)


def test_approximate_reaches_recall_target():
    rng = np.random.default_rng(4)
    passages = rng.normal(size=(3000, 32)).astype(np.float32)
    queries = rng.normal(size=(40, 32)).astype(np.float32)
    index = search.PassageIndex.from_embeddings(passages, make_mesh((4, 2)))
    _, exact = index.search(queries, 10)
    _, approximate = index.search(queries, 10, approximate=True, recall_target=0.9)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.9
    # The exact path on random (tie-free) data agrees with numpy's ranking.
    np.testing.assert_array_equal(exact, np.argsort(-(queries @ passages.T), axis=1)[:, :10])


@pytest.mark.parametrize("call, message", [
    (lambda index: index.search(np.zeros((2, DIM + 1), np.float32), 3), r"\[num_queries, 6\]"),
    (lambda index: index.search(np.full((2, DIM), np.nan, np.float32), 3), "non-finite"),
    (lambda index: index.search(np.zeros((2, DIM), np.float32), 0), "k must be >= 1"),
    (lambda index: index.search(np.zeros((2, DIM), np.float32), 3, exclude=[{1}, {37}]),
     r"exclude\[1\] names passage 37"),
    (lambda index: index.search(np.zeros((2, DIM), np.float32), 3, exclude=[{1}]),
     "1 exclude sets for 2 queries"),
    (lambda index: index.search(np.zeros((2, DIM), np.float32), 3, chunk_size=3),
     "multiple of the 2 query shards"),
])
def test_search_errors(call, message):
    index = search.PassageIndex.from_embeddings(np.ones((NUM_PASSAGES, DIM), np.float32),
                                                make_mesh((4, 2)), axis="data")
    with pytest.raises(ValueError, match=message):
        call(index)


def test_build_errors():
    mesh = make_mesh((4, 2))
    with pytest.raises(ValueError, match="distinct mesh axis names"):
        search.PassageIndex.from_embeddings(np.ones((4, DIM), np.float32), mesh, axis="rows")
    with pytest.raises(ValueError, match="held 5 rows, expected 4"):
        search.PassageIndex.from_chunks([np.ones((5, DIM), np.float32)], 4, mesh)
    with pytest.raises(ValueError, match="held 3 rows, expected 4"):
        search.PassageIndex.from_chunks([np.ones((3, DIM), np.float32)], 4, mesh)


# --- two processes, as two hosts would run it --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_build_from_their_rows_and_agree(tmp_path):
    """Each of two processes (2 CPU devices each) sends only the rows of `local_row_ranges`."""
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices(2),
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    workers = [subprocess.Popen([sys.executable, __file__, str(port), str(process), str(tmp_path)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for process in range(2)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    if any("gloo" in out.lower() and "not available" in out.lower() for out in outputs):
        pytest.skip(f"gloo CPU collectives are not available in this jaxlib: {outputs[0][-500:]}")
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]

    rng = np.random.default_rng(5)
    passages, queries = integer_embeddings(rng, NUM_PASSAGES), integer_embeddings(rng, 11)
    expected = brute_force(queries, passages, 6)
    ranges = []
    for process in range(2):
        for axis in ("data", "all"):
            result = np.load(tmp_path / f"process{process}_{axis}.npz")
            assert_same((result["scores"], result["indices"]), expected)
        ranges.append(np.load(tmp_path / f"process{process}_data.npz")["ranges"].tolist())
    # Rows over 'data' (2 x 2 mesh): each process holds its own half, not the other's.
    assert sorted(map(tuple, ranges[0] + ranges[1])) == [(0, 19), (19, NUM_PASSAGES)]


def _worker(port: str, process: str, out_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", 2, int(process))
    rng = np.random.default_rng(5)
    passages, queries = integer_embeddings(rng, NUM_PASSAGES), integer_embeddings(rng, 11)
    mesh = partitioning.make_mesh((2, 2))
    for axis in ("data", None):
        ranges = search.local_row_ranges(NUM_PASSAGES, mesh, axis=axis)
        # The rows of this process only, in chunks of 3 as an encoder would produce them.
        chunks = (passages[row:min(row + 3, stop)]
                  for start, stop in ranges for row in range(start, stop, 3))
        index = search.PassageIndex.from_chunks(chunks, NUM_PASSAGES, mesh, axis=axis)
        scores, indices = index.search(queries, 6, chunk_size=4)
        np.savez(os.path.join(out_dir, f"process{process}_{axis or 'all'}.npz"), scores=scores,
                 indices=indices, ranges=np.asarray(ranges))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
