"""samtone.compare and samtone-compare: p-values equal scipy's paired t-test and an exact
randomization test, Holm's correction a hand-computed example, seed groups numpy's mean/std
and a pooled test; evaluations of other data are refused (exit 2, one line naming both
folders) and --output is never replaced without --overwrite. The evaluation folders are
written here with constructed per-query values; tests/test_evaluate.py runs samtone-eval and
samtone-compare end to end."""
import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from samtone import compare
from samtone.errors import ConfigError, MissingDependencyError
from tiny_runs import REPO, run_argv

pytest.importorskip("ranx")

NUM_QUERIES = 40
ALL_METRICS = ("P@1", "MRR@10", "NDCG@10", "Recall@1", "Recall@10", "Recall@100")


def write_eval(folder, per_query, *, fingerprint="sha256:same", split="test",
               num_passages=500, query_ids=None):
    """A samtone-eval output folder holding `per_query` ({metric: values}; the metrics not
    given are copies of P@1)."""
    columns = {name: np.asarray(per_query.get(name, per_query["P@1"]), np.float64)
               for name in ALL_METRICS}
    count = len(columns["P@1"])
    query_ids = query_ids or [f"q{i}" for i in range(count)]
    folder.mkdir(parents=True)
    values = {name: float(column.mean()) for name, column in columns.items()}
    values.update(num_queries=count, num_passages=num_passages, step=1, data=["/data/beir"],
                  split=split, data_fingerprint=fingerprint)
    (folder / "metrics.json").write_text(json.dumps(values))
    (folder / "per_query.json").write_text(json.dumps(
        {"query_ids": query_ids,
         "metrics": {name: column.tolist() for name, column in columns.items()}}))
    return str(folder)


def random_values(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return {name: np.clip(rng.random(NUM_QUERIES) + shift, 0, 1) for name in ALL_METRICS}


def systems(*folders):
    return [compare.System(folder, [folder]) for folder in folders]


def _run(*args, cwd=REPO):
    return run_argv([sys.executable, "-m", "samtone.cli.compare", *args], cwd=cwd, timeout=300)


# --- the tests are ranx's, and give the references' p-values --------------------------------


def near(values, shift, noise, seed):
    """`values` (a random_values dict) + `shift` + normal noise: paired with them."""
    rng = np.random.default_rng(seed)
    return {name: column + shift + rng.normal(0, noise, len(column))
            for name, column in values.items()}


def test_student_p_values_equal_scipy_ttest_rel(tmp_path):
    base = random_values(0)
    values = {"a": base, "b": near(base, 0.1, 0.1, 1), "c": near(base, 0.01, 0.2, 2)}
    runs = {name: write_eval(tmp_path / name, column) for name, column in values.items()}
    result = compare.compare_systems(systems(*runs.values()), test="student")
    first = result["systems"][runs["a"]]
    assert first["baseline"] and all(c["p_value"] is None for c in first["metrics"].values())
    for system in "bc":
        for name in compare.COMPARE_METRICS:
            cell = result["systems"][runs[system]]["metrics"][name]
            expected = scipy.stats.ttest_rel(values["a"][name], values[system][name]).pvalue
            assert cell["p_value"] == pytest.approx(expected, abs=1e-6), (system, name)
            assert cell["mean"] == pytest.approx(np.mean(values[system][name]))
    # b is far better than a (p ~ 1e-8); c about the same.
    assert result["systems"][runs["b"]]["metrics"]["P@1"]["significant"]
    assert not result["systems"][runs["c"]]["metrics"]["P@1"]["significant"]


def exact_randomization_p_value(a, b):
    """Every one of the 2^n swaps of the pairs: the share whose |mean difference| reaches the
    observed one (Fisher's randomization test computed exactly)."""
    differences = np.asarray(b) - np.asarray(a)
    signs = np.array(list(itertools.product([1, -1], repeat=len(differences))))
    permuted = np.abs((signs * differences).mean(axis=1))
    return float(np.mean(permuted >= abs(differences.mean()) - 1e-12))


@pytest.mark.parametrize("shift", [0.05, 0.15, 0.3])
def test_fisher_p_value_is_reproducible_and_near_the_exact_randomization_test(shift):
    rng = np.random.default_rng(int(shift * 100))
    a = rng.random(12)
    b = a + shift + rng.normal(0, 0.3, 12)
    p_value = compare.paired_p_value(a, b, "fisher")
    assert compare.paired_p_value(a, b, "fisher") == p_value  # the seed holds
    # 10,000 permutations: Monte Carlo standard error <= 0.005.
    assert p_value == pytest.approx(exact_randomization_p_value(a, b), abs=0.02)


@pytest.mark.parametrize("test", compare.TESTS)
def test_identical_runs_give_p_1_and_a_constant_shift_a_tiny_p(test):
    values = np.random.default_rng(3).random(NUM_QUERIES)
    assert compare.paired_p_value(values, values.copy(), test) == 1.0
    assert compare.paired_p_value(values, values + 0.1, test) < 1e-3


def test_holm_against_a_hand_computed_example():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    # (adjusted values never decrease along the sorted order).
    np.testing.assert_allclose(compare.holm([0.01, 0.04, 0.03, 0.005]),
                               [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(compare.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(compare.holm([0.2]), [0.2])


def test_significance_marks_use_holm_over_the_compared_systems(tmp_path):
    """Per-query differences mu + s e, e = +-1 alternating: t = mu sqrt(39) / s exactly."""
    base = random_values(10)
    signs = np.where(np.arange(NUM_QUERIES) % 2, -1.0, 1.0)
    runs = [write_eval(tmp_path / "base", base)]
    # t = 2.25 (p = 0.030), t = 2.12 (p = 0.040), t = 50 (p ~ 1e-37).
    for i, shift in enumerate([0.036, 0.034, 0.8]):
        runs.append(write_eval(tmp_path / f"s{i}", {
            name: values + shift + 0.1 * signs for name, values in base.items()}))
    result = compare.compare_systems(systems(*runs), test="student")
    for name in compare.COMPARE_METRICS:
        cells = [result["systems"][run]["metrics"][name] for run in runs[1:]]
        p_values = [cell["p_value"] for cell in cells]
        assert p_values[0] == pytest.approx(0.030, abs=0.002)
        assert p_values[1] == pytest.approx(0.040, abs=0.002)
        adjusted = compare.holm(p_values)
        assert [cell["p_holm"] for cell in cells] == pytest.approx(list(adjusted))
        # Holm: 3 p(3), then max(that, 2 x 0.030 = 0.06), then max(0.06, 0.040): only the
        # large shift stays below 0.05, though all three raw p-values are.
        assert [cell["significant"] for cell in cells] == [False, False, True]
    table = compare.format_markdown(result)
    assert "(p=0.030) |" in table and "(p<0.001)* |" in table


# --- seeds --------------------------------------------------------------------------------


def test_seed_groups_give_numpy_mean_and_std_and_pool_the_test(tmp_path):
    def folder(name, seed, shift):
        return write_eval(tmp_path / name, random_values(seed, shift))

    ibs = [folder("ibs1", 0, 0.0), folder("ibs2", 1, 0.0), folder("ibs3", 2, 0.0)]
    samtone = [folder("st1", 3, 0.05), folder("st2", 4, 0.05), folder("st3", 5, 0.05)]
    parsed = compare.parse_runs(f"ibs={','.join(ibs)};samtone={','.join(samtone)}")
    assert parsed == [compare.System("ibs", ibs), compare.System("samtone", samtone)]
    result = compare.compare_systems(parsed, baseline="ibs", test="student")
    for name in compare.COMPARE_METRICS:
        seeds = {system: [random_values(seed, shift)[name] for seed in seeds]
                 for system, seeds, shift in [("ibs", (0, 1, 2), 0.0),
                                              ("samtone", (3, 4, 5), 0.05)]}
        for system, values in seeds.items():
            cell = result["systems"][system]["metrics"][name]
            means = [np.mean(v) for v in values]
            assert cell["mean"] == pytest.approx(np.mean(means))
            assert cell["std"] == pytest.approx(np.std(means, ddof=1))
        pooled = scipy.stats.ttest_rel(np.concatenate(seeds["ibs"]),
                                       np.concatenate(seeds["samtone"])).pvalue
        assert result["systems"]["samtone"]["metrics"][name]["p_value"] == pytest.approx(
            pooled, abs=1e-6)
    assert "| samtone | 3 | " in compare.format_markdown(result)
    assert " ± " in compare.format_markdown(result)


def test_different_seed_counts_are_refused(tmp_path):
    runs = [write_eval(tmp_path / f"e{i}", random_values(i)) for i in range(3)]
    with pytest.raises(ConfigError, match="'b' has 1 seed.* the baseline 'a' 2"):
        compare.compare_systems([compare.System("a", runs[:2]), compare.System("b", runs[2:])])


@pytest.mark.parametrize("text, expected", [
    ("A,B", [("A", ["A"]), ("B", ["B"])]),
    ("ibs=e1,e2;samtone=e3,e4", [("ibs", ["e1", "e2"]), ("samtone", ["e3", "e4"])]),
    ("x=runs/lr=0.1/eval; runs/b/ ", [("x", ["runs/lr=0.1/eval"]), ("runs/b", ["runs/b/"])]),
])
def test_runs_syntax(text, expected):
    assert [(s.name, s.folders) for s in compare.parse_runs(text)] == expected


@pytest.mark.parametrize("text, message", [
    ("A", "names 1 system; samtone-compare needs at least two"),
    ("a=e1,e2;;b=e3", "an empty group"),
    ("a=e1,,e2;b=e3", "the group 'a=e1,,e2' has an empty folder"),
    ("=e1;b=e2", "has an empty name"),
    ("a=e1;a=e2", "the system 'a' appears twice"),
])
def test_bad_runs_syntax_names_the_flag(text, message):
    with pytest.raises(ConfigError, match=f"--runs.*{message}"):
        compare.parse_runs(text)


def test_a_missing_ranx_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ranx", None)  # import ranx -> ImportError
    compare._ranx_tests.cache_clear()
    try:
        with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[analysis\]'"):
            compare.paired_p_value(np.zeros(3), np.ones(3))
    finally:
        compare._ranx_tests.cache_clear()


def test_compare_imports_neither_jax_nor_ranx_until_it_tests():
    probe = ("import sys\nimport samtone.compare, samtone.cli.compare\n"
             "print(sorted(m for m in ('jax', 'ranx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=False, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


# --- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"fingerprint": "sha256:other"}, "the queries or qrels differ"),
    ({"split": "dev"}, "the split differs .*'test' vs 'dev'"),
    ({"num_passages": 999}, "the corpus size differs"),
])
def test_evaluations_of_other_data_exit_2_naming_both_folders(tmp_path, change, message):
    a = write_eval(tmp_path / "a", random_values(0))
    b = write_eval(tmp_path / "b", random_values(1), **change)
    result = _run(f"--runs={a},{b}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert f"{a} and {b} were not evaluated on the same data: " in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_command_prints_the_table_and_writes_it_only_once_without_overwrite(tmp_path):
    a = write_eval(tmp_path / "evals" / "a", random_values(0))
    b = write_eval(tmp_path / "evals" / "b", random_values(1, 0.2))
    before = {path: path.read_bytes() for path in (tmp_path / "evals").rglob("*.json")}
    printed = _run("--runs=evals/a,evals/b", "--test=student", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "| evals/a (baseline) | 1 | " in printed.stdout
    assert "| evals/b | 1 | " in printed.stdout and "*" in printed.stdout
    assert not (tmp_path / "out").exists()

    written = _run(f"--runs={a},{b}", "--test=student", f"--output={tmp_path / 'out'}")
    assert written.returncode == 0, written.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    cell = saved["systems"][b]["metrics"]["NDCG@10"]
    expected = scipy.stats.ttest_rel(random_values(0)["NDCG@10"],
                                     random_values(1, 0.2)["NDCG@10"]).pvalue
    assert cell["p_value"] == pytest.approx(expected, abs=1e-6)
    assert cell["per_query"] == [pytest.approx(random_values(1, 0.2)["NDCG@10"].tolist())]
    assert (tmp_path / "out" / "compare.md").read_text().strip() in written.stdout

    again = _run(f"--runs={a},{b}", f"--output={tmp_path / 'out'}")
    assert again.returncode == 2 and "already holds compare.json" in again.stderr, again.stderr
    into_input = _run(f"--runs={a},{b}", f"--output={a}", "--overwrite")
    assert into_input.returncode == 2 and "is the input --runs" in into_input.stderr
    replaced = _run(f"--runs={a},{b}", "--baseline=" + b, f"--output={tmp_path / 'out'}",
                    "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["baseline"] == b
    assert before == {path: path.read_bytes() for path in (tmp_path / "evals").rglob("*.json")}


def test_a_folder_samtone_eval_did_not_write_is_named(tmp_path):
    a = write_eval(tmp_path / "a", random_values(0))
    (tmp_path / "b").mkdir()
    result = _run(f"--runs={a},{tmp_path / 'b'}")
    assert result.returncode == 2 and f"{tmp_path / 'b'}/metrics.json not found" in result.stderr
