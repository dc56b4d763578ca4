"""The SamToNe paper's Table 1 from one command: train, evaluate and test every cell.

    python benchmarks/paper_table.py --base_gin=configs/smoke.gin \
        --architectures=ade,ade_spl,sde \
        --losses=in_batch_softmax_bidirectional,samtone_query --seeds=0,1,2 \
        --eval_data=samtone/data/smoke/eval.jsonl [--gin.NAME=VALUE ...] \
        [--test=fisher|student] [--no_figures] --output=DIR

Each cell (architecture x loss x seed) is one `samtone-train` run, DIR/runs/<arch>/<loss>/
seed<k>: the base config, then gin/architectures/<arch>.gin and gin/losses/<loss>.gin, then
`train.seed = k`, a compilation cache shared by all cells (the seeds of a cell compile the same
programs), then the --gin.NAME=VALUE bindings. A run whose newest checkpoint is at TRAIN_STEPS
is reused; an interrupted one is trained again, which resumes it (samtone-train resumes on the
same MODEL_DIR). Each run is evaluated by `samtone-eval` into DIR/evals/<arch>/<loss>/seed<k>
(reused if its metrics.json is of the newest checkpoint, and newer than it). Then, per
architecture, samtone.compare tests every loss against the baseline (the first of --losses; in
the paper in-batch softmax) on the per-query values, the seeds pooled, and the table goes to
DIR/table.md and DIR/table.json: a row per architecture x loss, P@1 / MRR@10 / NDCG@10 as mean
± std over seeds and the paired p-value against the baseline of the same architecture. Per
architecture, `samtone-analyze` draws the paper's figure 6 (the first seed of the second loss
against the baseline's) into DIR/figures/<arch> (skipped, with a note, without matplotlib or
with --no_figures). Rerunning the same command trains and evaluates nothing again.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the checkout's samtone, also when run as a script

from samtone import compare  # noqa: E402  (numpy and json only: no JAX in this process)

METRICS = ("P@1", "MRR@10", "NDCG@10")
TABLE_MD, TABLE_JSON = "table.md", "table.json"
FIGURES = ("similarities.png", "distances.png", "tsne.png")  # samtone.analysis.FIGURES


def gin_names(folder: str) -> list[str]:
    return sorted(name[:-len(".gin")] for name in os.listdir(os.path.join(REPO, "gin", folder))
                  if name.endswith(".gin"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any number of --gin.NAME=VALUE: Gin bindings given to every samtone-train run, "
        "after the architecture and loss files (e.g. --gin.TRAIN_STEPS=200).")
    parser.add_argument("--base_gin", default="configs/smoke.gin",
                        help="the run's config, before the architecture and loss files")
    parser.add_argument("--architectures", default="ade,ade_spl,sde",
                        help="names of gin/architectures/*.gin, comma-separated")
    parser.add_argument("--losses", default="in_batch_softmax_bidirectional,samtone_query",
                        help="names of gin/losses/*.gin, comma-separated; the first is the "
                        "baseline the others are tested against")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed of each run")
    parser.add_argument("--eval_data", required=True,
                        help="samtone-eval --data: a BEIR folder or held-out pairs")
    parser.add_argument("--split", default=None, help="samtone-eval --split (BEIR only)")
    parser.add_argument("--test", default="fisher", choices=compare.TESTS)
    parser.add_argument("--no_figures", action="store_true", help="skip samtone-analyze")
    parser.add_argument("--output", required=True, help="folder for runs/, evals/, figures/, "
                        "table.md and table.json")
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if not (arg.startswith("--gin.") and "=" in arg)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (Gin bindings are "
                     "--gin.NAME=VALUE)")
    for binding in rest:
        name = binding[len("--gin."):].split("=", 1)[0].strip()
        if name in ("MODEL_DIR", "train.model_dir", "train.seed"):
            parser.error(f"{binding}: each cell sets its own {name} (--output, --seeds)")
    args.gin = rest
    for flag, folder in (("--architectures", "architectures"), ("--losses", "losses")):
        names = [name.strip() for name in getattr(args, flag[2:]).split(",") if name.strip()]
        known = gin_names(folder)
        for name in names:
            if name not in known:
                parser.error(f"{flag}: {name!r} has no gin/{folder}/{name}.gin; expected one "
                             f"of {', '.join(known)}")
        if len(set(names)) != len(names) or not names:
            parser.error(f"{flag}={getattr(args, flag[2:])}: expected distinct names")
        setattr(args, flag[2:], names)
    if len(args.losses) < 2:
        parser.error("--losses: give the baseline and at least one loss to test against it")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds}: expected integers, e.g. 0,1,2")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds={args.seeds}: a seed appears twice")
    if not os.path.isfile(os.path.join(REPO, args.base_gin)) and not os.path.isfile(
            args.base_gin):
        parser.error(f"--base_gin={args.base_gin}: no such file")
    if not os.path.exists(args.eval_data):
        parser.error(f"--eval_data={args.eval_data}: no such file or folder")
    args.eval_data = os.path.abspath(args.eval_data)
    args.output = os.path.abspath(args.output)
    return args


def train_steps(args: argparse.Namespace, architecture: str, loss: str) -> int:
    """TRAIN_STEPS of a cell's config, as samtone-train will read it (Gin, parsed here)."""
    # pylint: disable=import-outside-toplevel  (Gin's registry imports JAX: only when asked)
    import gin

    from samtone.cli import gin_parsing
    from samtone.cli import gin_registry  # noqa: F401  (registers the configurables)
    gin.clear_config()
    gin_parsing.parse(cell_gin_files(args, architecture, loss),
                      [binding[len("--gin."):].replace("=", " = ", 1) for binding in args.gin],
                      finalize=False)
    return int(gin_parsing.setting("train.num_train_steps"))


def cell_gin_files(args, architecture: str, loss: str) -> list[str]:
    return [args.base_gin, f"gin/architectures/{architecture}.gin", f"gin/losses/{loss}.gin"]


def cell_folder(args, kind: str, architecture: str, loss: str, seed: int) -> str:
    return os.path.join(args.output, kind, architecture, loss, f"seed{seed}")


def checkpoint_steps(model_dir: str) -> list[int]:
    """Steps saved in MODEL_DIR/checkpoints (samtone.checkpoints.manager's layout)."""
    folder = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def run(command: list[str], what: str) -> None:
    """Runs a samtone command from the repository root; stops naming `what` if it fails."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stdout[-2000:] + result.stderr[-4000:], file=sys.stderr)
        print(f"paper_table: {what} failed (exit {result.returncode}): "
              f"{' '.join(shlex.quote(part) for part in command)}", file=sys.stderr)
        sys.exit(result.returncode or 1)


def samtone_command(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", f"samtone.cli.{module}", *flags]


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.monotonic()

    def say(self, message: str) -> None:
        elapsed = datetime.timedelta(seconds=round(time.monotonic() - self.started))
        print(f"[{self.done}/{self.total} done, {elapsed}] {message}", flush=True)


def train_and_evaluate(args, architecture: str, loss: str, seed: int, steps: int,
                       progress: Progress) -> None:
    name = f"{architecture}/{loss}/seed{seed}"
    model_dir = cell_folder(args, "runs", architecture, loss, seed)
    eval_dir = cell_folder(args, "evals", architecture, loss, seed)
    saved = checkpoint_steps(model_dir)
    if saved and saved[-1] >= steps:
        progress.say(f"reused run {name} (step {saved[-1]})")
    else:
        progress.say(f"training {name}" + (f" (resuming from step {saved[-1]})" if saved
                                           else "") + f" to step {steps}")
        run(samtone_command(
            "train", *(f"--gin_file={path}" for path in cell_gin_files(args, architecture, loss)),
            f"--gin.MODEL_DIR={model_dir!r}", f"--gin.train.seed={seed}",
            f"--gin.train.compilation_cache_dir={os.path.join(args.output, 'compilation_cache')!r}",
            *args.gin), f"training {name}")
    metrics_file = os.path.join(eval_dir, compare.METRICS_FILE)
    newest = checkpoint_steps(model_dir)[-1]
    evaluated = None
    if os.path.isfile(metrics_file):
        with open(metrics_file, encoding="utf-8") as f:
            evaluated = json.load(f).get("step")
    checkpoint = os.path.join(model_dir, "checkpoints", str(newest))
    if evaluated == newest and (os.path.getmtime(metrics_file)
                                >= os.path.getmtime(checkpoint)):  # not of a checkpoint since
        progress.say(f"reused evaluation {name}")
    else:
        progress.say(f"evaluating {name}")
        run(samtone_command("eval", f"--model_dir={model_dir}", f"--data={args.eval_data}",
                            f"--output={eval_dir}", *([f"--split={args.split}"] if args.split
                                                      else []),
                            *(["--overwrite"] if evaluated is not None else [])),
            f"evaluating {name}")
    progress.done += 1


def draw_figures(args, architecture: str, progress: Progress) -> None:
    """samtone-analyze: the first seed of the second loss against the baseline's."""
    output = os.path.join(args.output, "figures", architecture)
    seed = args.seeds[0]
    if os.path.isfile(os.path.join(output, "summary.json")):
        progress.say(f"reused figures {output}")
        return
    progress.say(f"figures {architecture}: {args.losses[1]} against {args.losses[0]} "
                 f"(seed {seed})")
    tested, baseline = (cell_folder(args, "runs", architecture, loss, seed)
                        for loss in args.losses[1::-1])
    run(samtone_command("analyze", f"--model_dir={tested}", f"--compare={baseline}",
                        f"--data={args.eval_data}", f"--output={output}",
                        *([f"--split={args.split}"] if args.split else [])),
        f"figures of {architecture}")


def make_table(args) -> dict:
    """Per architecture, samtone.compare of every loss (seeds pooled) against the baseline."""
    rows = []
    first = None
    for architecture in args.architectures:
        systems = [compare.System(loss, [cell_folder(args, "evals", architecture, loss, seed)
                                         for seed in args.seeds]) for loss in args.losses]
        comparison = compare.compare_systems(systems, baseline=args.losses[0], test=args.test,
                                             metrics=METRICS)
        first = first or comparison
        for loss in args.losses:
            system = comparison["systems"][loss]
            rows.append({"architecture": architecture, "loss": loss,
                         "baseline": system["baseline"], "folders": system["folders"],
                         "metrics": {name: {key: system["metrics"][name][key] for key in
                                            ("mean", "std", "seeds", "p_value", "p_holm",
                                             "significant")} for name in METRICS}})
    return {"command": command_line(), "commit": git_commit(), "test": args.test,
            "baseline": args.losses[0], "seeds": args.seeds, "metrics": list(METRICS),
            "data": first["data"], "split": first["split"],
            "num_queries": first["num_queries"], "permutations": first["permutations"],
            "alpha": compare.ALPHA, "rows": rows}


def command_line() -> str:
    return " ".join(shlex.quote(part) for part in
                    ["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO),
                     *sys.argv[1:]])


def git_commit() -> str:
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain",
                                                           "--untracked-files=no") else "")


def format_table(table: dict) -> str:
    def cell(values: dict) -> str:
        text = f"{values['mean']:.4f}"
        if values["std"] is not None:
            text += f" ± {values['std']:.4f}"
        return text

    def p_cell(row: dict) -> str:
        if row["baseline"]:
            return "(baseline)"
        parts = []
        for name in table["metrics"]:
            p_value = row["metrics"][name]["p_value"]
            star = "*" if row["metrics"][name]["significant"] else ""
            parts.append((f"{p_value:.3f}" if p_value >= 0.001 else "<0.001") + star)
        return " / ".join(parts)

    lines = ["| architecture | loss | " + " | ".join(table["metrics"]) + " | p (" +
             " / ".join(table["metrics"]) + ") |",
             "|:--|:--|" + "--:|" * len(table["metrics"]) + "--:|"]
    for row in table["rows"]:
        lines.append(f"| {row['architecture']} | {row['loss']} | " +
                     " | ".join(cell(row["metrics"][name]) for name in table["metrics"]) +
                     f" | {p_cell(row)} |")
    test = (f"paired Fisher randomization test (ranx, {table['permutations']:,} permutations, "
            f"seed {compare.SEED})" if table["test"] == "fisher"
            else "paired Student t-test (ranx: scipy.stats.ttest_rel)")
    seeds = len(table["seeds"])
    lines += ["", f"Mean ± std over {seeds} seeds ({', '.join(map(str, table['seeds']))}; "
              f"std ddof 1) on {', '.join(table['data'])}"
              + (f" ({table['split']})" if table["split"] else "")
              + f", {table['num_queries']} queries. p: two-sided {test} against "
              f"{table['baseline']} of the same architecture, per-query values of the "
              f"{seeds} seeds pooled ({table['num_queries']} x {seeds}); * p < "
              f"{table['alpha']} after Holm's correction over the losses compared."]
    return "\n".join(lines)


def write_table(args, table: dict) -> str:
    markdown = "\n".join([f"Command: `{table['command']}`", "",
                          f"Git commit: {table['commit']}", "", format_table(table), ""])
    os.makedirs(args.output, exist_ok=True)
    for name, text in ((TABLE_MD, markdown), (TABLE_JSON, json.dumps(table, indent=1) + "\n")):
        temporary = os.path.join(args.output, name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, os.path.join(args.output, name))
    return markdown


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    print(f"command: {command_line()}\ncommit:  {git_commit()}", flush=True)
    cells = [(architecture, loss, seed) for architecture in args.architectures
             for loss in args.losses for seed in args.seeds]
    steps = {}
    for architecture, loss, _ in cells:  # every config checked before anything trains
        if (architecture, loss) not in steps:
            steps[architecture, loss] = train_steps(args, architecture, loss)
    progress = Progress(len(cells))
    for architecture, loss, seed in cells:
        train_and_evaluate(args, architecture, loss, seed, steps[architecture, loss], progress)
    progress.say("paired tests")
    markdown = write_table(args, make_table(args))
    print("\n" + markdown + f"\nwritten: {os.path.join(args.output, TABLE_MD)}, "
          f"{os.path.join(args.output, TABLE_JSON)}", flush=True)
    if args.no_figures:
        print("figures: skipped (--no_figures)", flush=True)
    elif importlib.util.find_spec("matplotlib") is None:
        print("figures: skipped (matplotlib is not installed: pip install -e '.[analysis]')",
              flush=True)
    else:
        for architecture in args.architectures:
            draw_figures(args, architecture, progress)
        print(f"figures: {os.path.join(args.output, 'figures')}/<architecture>/"
              f"{{{','.join(FIGURES)}}}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
