"""README.md and docs/*.md stay runnable: every command they show exists and takes its flags.

For each `samtone-*` command in a fenced code block (and in inline code that starts with one),
the command must be a console script of setup.py and every `--flag` shown must be one that
command defines, as its own `--help` lists them (`--gin.NAME=...` for the commands that take
Gin bindings, `--noFLAG` for a boolean flag). `python benchmarks/X.py` and `python scripts/X.py`
must exist and accept the flags shown (their argparse `--help`). Files the pages name
(`configs/`, `gin/`, `launch/`, `benchmarks/`, `scripts/`, `samtone/`, `tests/`) must exist,
and links between the pages must resolve.
"""
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEST_COMMAND = "python -m pytest -q -n 2 --dist loadfile tests"

# Flags absl defines for every program; `--help` does not list them.
ABSL_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok"}

_COMMAND = re.compile(r"(?:(?<=[\s`$(])|^)(?:[\w./~-]*/)?(samtone-[a-z_]+)(?=\s|$)")
_SCRIPT = re.compile(r"(?:(?<=[\s`$(])|^)(?:[\w./~-]*/)?python3?\s+((?:benchmarks|scripts)/\S+)")
_SEPARATOR = re.compile(r"\s(?:&&|\|\||\||;)\s")


def console_scripts() -> dict[str, str]:
    """{'samtone-train': 'samtone.cli.train', ...} from setup.py's entry points."""
    text = (REPO / "setup.py").read_text()
    found = dict(re.findall(r'"(samtone-[a-z_]+)=(samtone\.cli\.[a-z_]+):console_entry"', text))
    assert len(found) >= 7, found
    return found


def _help(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                            timeout=300, check=False, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(argv)} --help exited {result.returncode}:\n" \
        f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout + result.stderr


@functools.lru_cache(maxsize=None)
def command_flags(module: str) -> tuple[frozenset, frozenset]:
    """(every flag, the boolean ones) of a samtone command, from its `--help`."""
    text = _help(["-m", module])
    names, booleans = set(), set()
    blocks = re.split(r"\n(?=  --)", text)
    for block in blocks:
        match = re.match(r"\s*--([A-Za-z0-9_]+):", block)
        if match:
            names.add(match.group(1))
            if re.search(r"\(default: '(?:true|false)'\)", block):
                booleans.add(match.group(1))
    assert "traceback" in names, f"{module} --help lists no flags:\n{text[-2000:]}"
    return frozenset(names), frozenset(booleans)


@functools.lru_cache(maxsize=None)
def script_flags(script: str) -> frozenset:
    """Every `--flag` a benchmark or script's argparse `--help` shows."""
    return frozenset(re.findall(r"--([A-Za-z0-9_][A-Za-z0-9_-]*)", _help([script])))


def blocks_and_spans(text: str):
    """(line number, command text): each logical line of a fenced block (backslash
    continuations joined), then each inline code span outside the blocks."""
    lines = text.splitlines()
    outside = []
    in_fence, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            outside.append("")
            continue
        if not in_fence:
            outside.append(line)
            continue
        outside.append("")
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    # Inline spans may wrap lines; keep newlines only to report the line number.
    prose = "\n".join(outside)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        yield prose.count("\n", 0, match.start()) + 1, match.group(1).replace("\n", " ")


def _arguments(rest: str) -> list[str]:
    rest = _SEPARATOR.split(" " + rest + " ")[0]
    try:
        return shlex.split(rest, comments=True)
    except ValueError:
        return rest.split()


def _flag_names(tokens: list[str]):
    for token in tokens:
        token = token.lstrip("[").rstrip("]")
        if token.startswith("--") and len(token) > 2:
            yield token, token[2:].split("=", 1)[0]


def check_text(text: str, name: str = "page") -> list[str]:
    """Every problem with the commands of one page, as 'name:line: ...' strings."""
    scripts = console_scripts()
    problems = []
    for line, code in blocks_and_spans(text):
        for match in _COMMAND.finditer(code):
            command = match.group(1)
            if command not in scripts:
                problems.append(f"{name}:{line}: {command} is not a console script of setup.py")
                continue
            tokens = _arguments(code[match.end():])
            flags, booleans = command_flags(scripts[command])
            for token, flag in _flag_names(tokens):
                if flag.startswith("gin.") and "gin_bindings" in flags:
                    continue
                if flag in flags or flag in ABSL_FLAGS:
                    continue
                if flag.startswith("no") and flag[2:] in booleans:
                    continue
                problems.append(f"{name}:{line}: {command} has no flag {token}")
            for token in tokens:
                value = token.lstrip("[").rstrip("]")
                if value.startswith("--gin_file="):
                    path = value.split("=", 1)[1].strip("'\"")
                    if path.startswith(("configs/", "gin/")) and not (REPO / path).is_file():
                        problems.append(f"{name}:{line}: {command} --gin_file={path}: no such file")
        for match in _SCRIPT.finditer(code):
            script = match.group(1).strip("`")
            if re.search(r"[*?{\[]", script):
                continue  # a pattern in prose, not a command
            if not (REPO / script).is_file():
                problems.append(f"{name}:{line}: {script} does not exist")
                continue
            known = script_flags(script)
            for token, flag in _flag_names(_arguments(code[match.end():])):
                if flag.startswith("gin.") and "gin" in known:
                    continue  # the script passes --gin.NAME=VALUE bindings on
                if flag not in known:
                    problems.append(f"{name}:{line}: {script} has no flag {token}")
    return problems


def _prose(text: str) -> str:
    """The text with every fenced block blanked (line numbers kept)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        fence = line.lstrip().startswith("```")
        in_fence = in_fence != fence
        lines.append("" if fence or in_fence else line)
    return "\n".join(lines)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _prose(path.read_text()).splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
@pytest.mark.slow
def test_every_command_exists_and_takes_its_flags(page):
    problems = check_text(page.read_text(), str(page.relative_to(REPO)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_files_and_links_exist(page):
    text, problems = page.read_text(), []
    for path in sorted(set(re.findall(
            r"(?<![\w/.])((?:launch|benchmarks|scripts|configs)/[\w.-]+\.(?:sh|py|gin)"
            r"|gin/[\w/]+\.gin|samtone/[\w/]+\.py|tests/\w+\.py)", text))):
        if not (REPO / path).is_file():
            problems.append(f"names {path}, which does not exist")
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            problems.append(f"links to {target}, which does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"links to {target}, whose page has no heading #{anchor}")
    assert not problems, f"{page.relative_to(REPO)}: " + "\n".join(problems)


def test_readme_keeps_the_test_command_and_stays_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert any(TEST_COMMAND in line for line in lines), TEST_COMMAND  # CI greps for it
    assert len(lines) <= 300, "README.md grew past 300 lines: move the detail to docs/"


def test_the_check_catches_what_it_should():
    """A made-up flag, a Gin binding on a command without Gin, a missing command, config or
    script, a made-up benchmark flag; and accepts negated booleans, Gin bindings, absl's."""
    page = "\n".join([
        "```bash",
        ".venv/bin/samtone-eval --model_dir=runs/x --data=d.jsonl \\",
        "  [--no_such_flag=3]",
        "samtone-export --model_dir=runs/x --output=o --gin.MODEL_DIR=\"'/x'\"",
        "samtone-frobnicate --x=1",
        "samtone-train --gin_file=configs/no_such_config.gin --gin.TRAIN_STEPS=3",
        "python benchmarks/no_such_benchmark.py",
        "python benchmarks/train_step.py --size=tiny --no-incumbent --no_such_option",
        "```",
        "Inline too: `samtone-mine --model_dir=runs/x --k=4 --made_up`.",
        "Fine: `samtone-eval --noapproximate --overwrite --top_k=20`, "
        "`samtone-train --gin.train.microbatches=4 --helpfull`.",
    ])
    problems = check_text(page)
    expected = ["page:2: samtone-eval has no flag --no_such_flag=3",
                "page:4: samtone-export has no flag --gin.MODEL_DIR=",
                "page:5: samtone-frobnicate is not a console script",
                "page:6: samtone-train --gin_file=configs/no_such_config.gin: no such file",
                "page:7: benchmarks/no_such_benchmark.py does not exist",
                "page:8: benchmarks/train_step.py has no flag --no_such_option",
                "page:10: samtone-mine has no flag --made_up"]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    assert len(problems) == len(expected), problems
