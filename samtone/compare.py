"""Paired significance tests between samtone-eval outputs: what samtone-compare computes.

    samtone-compare --runs=EVAL_A,EVAL_B --baseline=EVAL_A --test=fisher    # samtone.cli.compare
    systems = parse_runs("ibs=runs/ibs1/eval/scifact,runs/ibs2/eval/scifact;samtone=...")
    comparison = compare_systems(systems, baseline="ibs", test="fisher")
    print(format_markdown(comparison))

A system is one samtone-eval output folder (metrics.json, per_query.json), or several, one
per training seed. All folders must have been evaluated on the same queries and judgements
(`data_fingerprint`), split and corpus size; anything else is refused (ConfigError) naming the
two folders and what differs, since per-query values only pair up on the same queries.

For each metric of COMPARE_METRICS a system's value is the mean over its seeds of the
per-seed means (± the standard deviation over seeds, ddof=1, with two seeds or more). Each
system is tested against the baseline with ranx's paired tests on the per-query values, the
seeds pooled: (query, seed) is the unit, seed i of a system paired with seed i of the
baseline, so both need the same number of seeds.

  fisher   ranx's Fisher randomization test (two-sided, PERMUTATIONS permutations, seed SEED).
           ranx compiles it with numba `parallel=True`, whose worker threads ignore the seed;
           we compile ranx's own function serially (`numba.njit(test.py_func)`), so the seed
           holds and the p-values are reproducible.
  student  ranx's two-sided paired Student t-test (scipy.stats.ttest_rel).

Identical per-query values get p = 1 (the t statistic would be 0/0). A system is marked
significant where its p-value, Holm-corrected over the systems compared with the baseline on
that metric (`holm`), is below ALPHA. Only numpy, json and (lazily) ranx: no JAX.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Sequence

import numpy as np

from samtone import output_folder
from samtone import run_dir
from samtone.errors import ConfigError, MissingDependencyError, MissingFileError

COMPARE_METRICS = ("P@1", "MRR@10", "NDCG@10", "Recall@10", "Recall@100")
TESTS = ("fisher", "student")
PERMUTATIONS = 10_000  # the Monte Carlo error of a Fisher p-value is at most 0.005
SEED = 42
ALPHA = 0.05
METRICS_FILE = "metrics.json"  # samtone.evaluate's names (not imported: it brings JAX)
PER_QUERY_FILE = "per_query.json"
JSON_FILE = "compare.json"
MARKDOWN_FILE = "compare.md"
# What two evaluations must share (metrics.json keys) for their per-query values to pair.
SAME_DATA_KEYS = ("data_fingerprint", "split", "num_passages")
_NAME = re.compile(r"[^/\\=,;]+")


@dataclasses.dataclass
class System:
    """A model compared: its name in the table, and one samtone-eval folder per seed."""

    name: str
    folders: list[str]


@dataclasses.dataclass
class Evaluation:
    """A samtone-eval output folder: metrics.json and the per-query values."""

    folder: str
    values: dict  # metrics.json
    query_ids: list[str]
    per_query: dict[str, np.ndarray]  # metric -> float64 [num queries], in query_ids order


def parse_runs(text: str, flag: str = "--runs") -> list[System]:
    """Systems from `ibs=E1,E2;samtone=E3,E4` (a named group per system, one folder per seed)
    or `E1,E2` (each folder a system of one seed, named by the folder as given); groups are
    separated by ';' and may be mixed. A folder whose path holds '=' goes in a named group."""
    systems = []
    for group in (part.strip() for part in (text or "").split(";")):
        if not group:
            raise ConfigError(f"{flag}={text!r}: an empty group (two ';' in a row, or one at an "
                              "end); expected e.g. 'ibs=E1,E2;samtone=E3,E4' or 'E1,E2'")
        name, equals, rest = group.partition("=")
        named = bool(equals) and "/" not in name and "," not in name
        folders = [folder.strip() for folder in (rest if named else group).split(",")]
        if named and not _NAME.fullmatch(name.strip()):
            raise ConfigError(f"{flag}={text!r}: the group {group!r} has an empty name; "
                              "expected NAME=FOLDER[,FOLDER...]")
        if any(not folder for folder in folders):
            raise ConfigError(f"{flag}={text!r}: the group {group!r} has an empty folder "
                              "(two ',' in a row, or one at an end)")
        if named:
            systems.append(System(name.strip(), folders))
        else:
            systems.extend(System(folder.rstrip("/") or folder, [folder]) for folder in folders)
    names = [system.name for system in systems]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{flag}: the system {repeated[0]!r} appears twice; give each system "
                          "one name (NAME=SEED1,SEED2 for several seeds)")
    if len(systems) < 2:
        raise ConfigError(f"{flag}={text!r} names {len(systems)} system; samtone-compare needs "
                          "at least two (e.g. --runs=EVAL_A,EVAL_B)")
    return systems


def read_evaluation(folder: str) -> Evaluation:
    """metrics.json and per_query.json of a samtone-eval output folder."""
    metrics_path = os.path.join(folder, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise MissingFileError(f"--runs: {metrics_path} not found; each folder must be a "
                               "samtone-eval output (metrics.json, per_query.json)")
    with open(metrics_path, encoding="utf-8") as f:
        values = json.load(f)
    per_query_path = os.path.join(folder, PER_QUERY_FILE)
    if not os.path.isfile(per_query_path):
        what = ("a graded-pairs evaluation (Spearman/Pearson), which has no per-query values"
                if "Spearman" in values else
                f"no {PER_QUERY_FILE} (training's evaluations and samtone-eval before it wrote "
                "one have none); evaluate it with samtone-eval (--overwrite)")
        raise ConfigError(f"--runs: {folder} holds {what}")
    with open(per_query_path, encoding="utf-8") as f:
        per_query = json.load(f)
    columns = {name: np.asarray(column, np.float64)
               for name, column in per_query["metrics"].items()}
    return Evaluation(folder, values, list(per_query["query_ids"]), columns)


def check_same_data(evaluations: Sequence[Evaluation]) -> None:
    """Refuses evaluations of other queries, qrels, split or corpus size than the first's."""
    first = evaluations[0]
    for evaluation in evaluations:
        if "data_fingerprint" not in evaluation.values:
            raise ConfigError(f"--runs: {evaluation.folder}/{METRICS_FILE} has no "
                              "data_fingerprint (samtone-eval before it recorded one); "
                              "evaluate it again with samtone-eval (--overwrite)")
    for evaluation in evaluations[1:]:
        for key in SAME_DATA_KEYS:
            mine, theirs = first.values.get(key), evaluation.values.get(key)
            if mine != theirs:
                what = {"data_fingerprint": "the queries or qrels differ",
                        "split": "the split differs",
                        "num_passages": "the corpus size differs"}[key]
                raise ConfigError(
                    f"--runs: {first.folder} and {evaluation.folder} were not evaluated on the "
                    f"same data: {what} ({key} {mine!r} vs {theirs!r}; data "
                    f"{_data(first)} vs {_data(evaluation)}); per-query values pair only on "
                    "the same queries")
        if evaluation.query_ids != first.query_ids:
            raise ConfigError(f"--runs: {first.folder} and {evaluation.folder} list their "
                              f"queries differently in {PER_QUERY_FILE}")


def _data(evaluation: Evaluation) -> str:
    data = ",".join(evaluation.values.get("data", ["?"]))
    split = evaluation.values.get("split")
    return f"{data} ({split})" if split else data


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order.

    With m p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    max over j <= i of min(1, (m - j + 1) p_(j)); rejecting where it is below alpha controls
    the family-wise error rate at alpha. (statsmodels' multipletests(method="holm") computes
    the same; it is not a dependency here.)
    """
    p_values = np.asarray(p_values, np.float64)
    order = np.argsort(p_values, kind="stable")
    count = len(p_values)
    scaled = np.minimum(1.0, (count - np.arange(count)) * p_values[order])
    adjusted = np.empty(count)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


@functools.cache
def _ranx_tests():
    """ranx's Fisher randomization test (compiled serially, so that its seed holds) and
    paired t-test; a MissingDependencyError saying what to install if ranx is absent."""
    try:
        import numba  # pylint: disable=import-outside-toplevel  (a ranx dependency)
        from ranx import statistical_tests  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise MissingDependencyError(
            f"samtone-compare needs ranx for its paired tests ({error}); install the "
            "'analysis' extra: pip install -e '.[analysis]' (or pip install ranx)") from None
    fisher = numba.njit(statistical_tests.fisher_randomization_test.py_func)
    return fisher, statistical_tests.paired_student_t_test


def paired_p_value(baseline: np.ndarray, other: np.ndarray, test: str = "fisher") -> float:
    """Two-sided p-value of ranx's paired `test` ("fisher" or "student"); 1 when the values
    are identical."""
    if test not in TESTS:
        raise ConfigError(f"--test={test!r}; expected one of {', '.join(TESTS)}")
    baseline = np.ascontiguousarray(baseline, np.float64)
    other = np.ascontiguousarray(other, np.float64)
    if baseline.shape != other.shape or baseline.ndim != 1:
        raise ValueError(f"paired tests need two equal-length vectors, got {baseline.shape} "
                         f"and {other.shape}")
    if np.array_equal(baseline, other):
        return 1.0
    fisher, student = _ranx_tests()
    if test == "fisher":
        p_value, _ = fisher(baseline, other, PERMUTATIONS, ALPHA, SEED)
    else:
        p_value, _ = student(baseline, other, ALPHA)
    return float(p_value)


def compare_systems(systems: Sequence[System], *, baseline: str | None = None,
                    test: str = "fisher",
                    metrics: Sequence[str] = COMPARE_METRICS) -> dict:
    """Reads, checks and tests `systems` against `baseline` (a name, or the folder of a
    one-seed system; default the first). Returns what compare.json holds."""
    if test not in TESTS:
        raise ConfigError(f"--test={test!r}; expected one of {', '.join(TESTS)}")
    base = _find_baseline(systems, baseline)
    evaluations = {system.name: [read_evaluation(folder) for folder in system.folders]
                   for system in systems}
    every = [evaluation for group in evaluations.values() for evaluation in group]
    check_same_data(every)
    _ranx_tests()  # before any test: say now if ranx is missing
    missing = [name for name in metrics if name not in every[0].per_query]
    if missing:
        raise ConfigError(f"--runs: {every[0].folder}/{PER_QUERY_FILE} has no {missing[0]}")
    seeds = len(base.folders)
    for system in systems:
        if len(system.folders) != seeds:
            raise ConfigError(
                f"--runs: the system {system.name!r} has {len(system.folders)} seed(s) and the "
                f"baseline {base.name!r} {seeds}; the pooled test pairs seed i of each system "
                "with seed i of the baseline, so give every system the same number")
    pooled = {system.name: {name: np.concatenate([e.per_query[name]
                                                  for e in evaluations[system.name]])
                            for name in metrics} for system in systems}
    others = [system for system in systems if system is not base]
    rows = {}
    for system in systems:
        rows[system.name] = {"folders": list(system.folders), "baseline": system is base,
                             "metrics": {}}
        for name in metrics:
            per_seed = [float(np.mean(e.per_query[name])) for e in evaluations[system.name]]
            rows[system.name]["metrics"][name] = {
                "mean": float(np.mean(per_seed)),
                "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
                "seeds": per_seed, "p_value": None, "p_holm": None, "significant": False,
                "per_query": [e.per_query[name].tolist() for e in evaluations[system.name]]}
    for name in metrics:
        p_values = [paired_p_value(pooled[base.name][name], pooled[system.name][name], test)
                    for system in others]
        for system, p_value, adjusted in zip(others, p_values, holm(p_values)):
            cell = rows[system.name]["metrics"][name]
            cell.update(p_value=p_value, p_holm=float(adjusted),
                        significant=bool(adjusted < ALPHA))
    first = every[0].values
    return {"baseline": base.name, "test": test, "alpha": ALPHA, "correction": "holm",
            "permutations": PERMUTATIONS if test == "fisher" else None,
            "seed": SEED if test == "fisher" else None, "metrics": list(metrics),
            "data": first.get("data"), "split": first.get("split"),
            "data_fingerprint": first["data_fingerprint"], "num_queries": len(every[0].query_ids),
            "seeds": seeds, "query_ids": every[0].query_ids, "systems": rows}


def _find_baseline(systems: Sequence[System], baseline: str | None) -> System:
    if baseline is None:
        return systems[0]
    for system in systems:
        if baseline == system.name or (len(system.folders) == 1 and os.path.abspath(baseline)
                                       == os.path.abspath(system.folders[0])):
            return system
    raise ConfigError(f"--baseline={baseline} is none of the systems of --runs: "
                      f"{', '.join(system.name for system in systems)}")


def format_markdown(comparison: dict) -> str:
    """The table (rows: systems; columns: metrics, mean ± std over seeds, p against the
    baseline, * where significant after Holm), then a line saying how it was tested."""
    names = comparison["metrics"]
    lines = ["| system | seeds | " + " | ".join(names) + " |",
             "|:--|--:|" + "--:|" * len(names)]
    for system, row in comparison["systems"].items():
        label = f"{system} (baseline)" if row["baseline"] else system
        cells = [_cell(row["metrics"][name]) for name in names]
        lines.append(f"| {label} | {len(row['folders'])} | " + " | ".join(cells) + " |")
    if comparison["test"] == "fisher":
        test = (f"paired Fisher randomization test (ranx, {comparison['permutations']:,} "
                f"permutations, seed {comparison['seed']})")
    else:
        test = "paired Student t-test (ranx: scipy.stats.ttest_rel)"
    count = len(comparison["systems"]) - 1
    unit = (f"{comparison['num_queries']} queries" if comparison["seeds"] == 1 else
            f"{comparison['num_queries']} queries x {comparison['seeds']} seeds pooled")
    spread = "; ± std over seeds (ddof 1)" if comparison["seeds"] > 1 else ""
    lines += ["", f"p: two-sided {test} against {comparison['baseline']} over {unit}; "
              f"* p < {comparison['alpha']} after Holm's correction over the {count} "
              f"comparison{'s' if count > 1 else ''} of each metric{spread}."]
    return "\n".join(lines)


def _cell(cell: dict) -> str:
    text = f"{cell['mean']:.4f}"
    if cell["std"] is not None:
        text += f" ± {cell['std']:.4f}"
    if cell["p_value"] is not None:
        p_value = cell["p_value"]
        text += f" (p={p_value:.3f})" if p_value >= 0.001 else " (p<0.001)"
        text += "*" if cell["significant"] else ""
    return text


# --- files ----------------------------------------------------------------------------------


def check_output(output_dir: str, systems: Sequence[System], overwrite: bool) -> None:
    """Refuses an output that is or holds an input folder, or (without `overwrite`) already
    holds compare.json / compare.md."""
    inputs = [("--runs", folder) for system in systems for folder in system.folders]
    run_dir.check_output(output_dir, inputs, flag="--output")
    output_folder.check_files(output_dir, [JSON_FILE, MARKDOWN_FILE], overwrite)


def write_comparison(output_dir: str, comparison: dict, overwrite: bool) -> list[str]:
    """compare.json and compare.md in `output_dir`, both or neither; returns their paths."""
    names = [MARKDOWN_FILE, JSON_FILE]
    with output_folder.write_files_atomically(output_dir, names, overwrite) as temporary:
        with open(os.path.join(temporary, JSON_FILE), "w", encoding="utf-8") as f:
            f.write(_readable_json(comparison) + "\n")
        with open(os.path.join(temporary, MARKDOWN_FILE), "w", encoding="utf-8") as f:
            f.write(format_markdown(comparison) + "\n")
    return [os.path.join(output_dir, name) for name in names]


def _readable_json(value, indent: str = "") -> str:
    """JSON with one key per line, but each list of numbers or strings on one line (the
    per-query values would otherwise take a line each)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_readable_json(item, inner)}"
                 for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        items = [inner + _readable_json(item, inner) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value)
