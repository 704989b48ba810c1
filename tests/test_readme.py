"""Every command shown in README.md and docs/*.md works as written.

Concrete commands (`bnexport fold models/digits_cnn.pt2`, ...) are run in a copy of models/;
the Python snippets are run; synopses with placeholders (MODEL, OUT.onnx, ...) name only flags
that `bnexport COMMAND --help` knows; commands that take minutes (the benchmark scripts) are
checked to name a real script and real flags, and run in quick mode by test_benchmark_smoke.
`test_every_shown_command_is_tested` fails on a command shown in a page that no test covers.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
COMMANDS = ("fold", "verify", "inspect", "recalibrate")

# Every concrete `bnexport` command the pages show, and the test that runs it as written.
RUN_AS_WRITTEN = {
    "bnexport fold models/digits_cnn.pt2": (
        "test_quick_start_command_runs_as_written",
        "test_deploy_snippet_runs_on_the_exported_file",
    ),
    "bnexport fold models/digits_cnn.unfolded.onnx": (
        "test_quick_start_onnx_command_runs_as_written",
    ),
    "bnexport inspect models/digits_cnn_stale.pt2": ("test_stale_model_commands_run_as_written",),
    "bnexport recalibrate models/digits_cnn_stale.pt2 --data models/digits_cnn_stale_calib.npz": (
        "test_stale_model_commands_run_as_written",
    ),
    "bnexport fold models/digits_cnn_stale.recalibrated.pt2": (
        "test_stale_model_commands_run_as_written",
    ),
    "bnexport fold models/digits_cnn.pt2 --fp16 -o digits_fp16.onnx": (
        "test_float16_command_runs_as_written",
    ),
    "bnexport --help": ("test_help_and_version_answer",),
}

# The set-up and test commands, which .ci/run runs (test_install_and_test_commands_match_ci).
CI_COMMANDS = ('python3 -m pip install -c constraints.txt -e ".[test]"', "python3 -m pytest -q")

FENCE = re.compile(r"^\s*(```|~~~)\s*(\w*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
INLINE_CODE = re.compile(r"`([^`]+)`")
COMMAND_START = re.compile(r"^(bnexport|python3?|pip|ruff)(\s|$)")
PLACEHOLDER = re.compile(r"(?<![\w.])[A-Z][A-Z0-9_]*(?![a-z])|\.\.\.")
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def _section(path: Path, title: str) -> str:
    """The text of the heading `title` (any level) of `path`, up to the next heading of the
    same or a higher level; headings inside fenced code do not count."""
    lines = path.read_text().splitlines()
    start = level = None
    fenced = False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if not match:
            continue
        if start is None and match.group(2) == title:
            start, level = i, len(match.group(1))
        elif start is not None and len(match.group(1)) <= level:
            return "\n".join(lines[start:i])
    if start is None:
        raise AssertionError(f"no heading {title!r} in {path.relative_to(ROOT)}")
    return "\n".join(lines[start:])


def _block_commands(text: str, prefix: str) -> list[str]:
    """The command lines of indented code blocks in `text` that start with `prefix`."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.startswith("    ") and line.strip().startswith(prefix)
    ]


def _output_block(text: str) -> list[str]:
    """The lines of the first fenced block without a language: printed output."""
    match = re.search(r"^```\n(.*?)^```", text, re.S | re.M)
    assert match, "no output block"
    return match.group(1).splitlines()


def _cells(line: str) -> list[str]:
    """The cells of a table row, drawn (`│ a │ b │`, a terminal) or plain (`a  b`, piped)."""
    if line.startswith(("┃", "│")):
        return [cell.strip() for cell in re.split("[┃│]", line)[1:-1]]
    return re.split(r"\s{2,}", line.strip())


def _python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def shown_commands(path: Path) -> list[str]:
    """The commands a page shows: lines of indented code blocks (a synopsis with its
    continuation lines) and of shell blocks, and inline code spans, that start with bnexport,
    python, pip or ruff."""
    found: list[str] = []
    prose: list[str] = []
    fenced = shell = False
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        fence = FENCE.match(line)
        if fence:
            fenced = not fenced
            shell = fenced and fence.group(2) in ("sh", "bash", "shell", "console")
            prose.append("")
            continue
        if fenced:
            if shell and COMMAND_START.match(line.strip().removeprefix("$ ")):
                found.append(line.strip().removeprefix("$ "))
            prose.append("")
            continue
        stripped = line.strip()
        if line.startswith("    ") and COMMAND_START.match(stripped):
            current = [stripped]
            found.append(stripped)
            prose.append("")
            continue
        if line.startswith("    ") and current is not None and stripped[:1] in "[(":
            current.append(stripped)
            found[-1] = " ".join(current)
            prose.append("")
            continue
        current = None
        prose.append("" if line.startswith("    ") else line)
    for span in INLINE_CODE.findall("\n".join(prose)):
        span = " ".join(span.split())
        if COMMAND_START.match(span):
            found.append(span)
    return found


def _all_shown() -> list[tuple[str, str]]:
    return [(p.name, c) for p in PAGES for c in shown_commands(p)]


def _bnexport_words(command: str) -> list[str] | None:
    """The words after `bnexport` of a bnexport command (also `python -m bnexport ...`)."""
    words = command.split()
    if words[:1] == ["bnexport"]:
        return words[1:]
    if words[:3] in (["python", "-m", "bnexport"], ["python3", "-m", "bnexport"]):
        return words[3:]
    return None


def _is_synopsis(command: str) -> bool:
    return bool(PLACEHOLDER.search(command))


def _kind(command: str) -> str | None:
    """Which test covers a shown command (None: none does)."""
    words = command.split()
    rest = _bnexport_words(command)
    if rest is not None:
        if not rest or (len(rest) == 1 and rest[0] in COMMANDS):
            return "name"  # `bnexport fold` in a sentence: the program's or command's name
        if _is_synopsis(command):
            return "synopsis"
        return "run" if command in RUN_AS_WRITTEN else None
    if words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        if words[2].startswith("models."):
            return "models"
        return "ci" if command in CI_COMMANDS else None
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].startswith("benchmarks/"):
        return "benchmark"
    if words[:2] == ["pip", "install"]:
        return "extras"
    if words[0] == "ruff":
        return "lint"
    return None


def _metrics() -> dict:
    """The shipped models' measured test figures, as `python -m models.train` wrote them."""
    return json.loads((ROOT / "models" / "metrics.json").read_text())


def _workdir(tmp_path: Path) -> Path:
    def generated(_: str, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(".onnx") and not n.endswith(".unfolded.onnx")]

    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=generated)
    return tmp_path


def _argv(command: str) -> list[str]:
    """A shown command as an argv for this interpreter."""
    words = command.split()
    if words[0] == "bnexport":
        return [sys.executable, "-m", "bnexport", *words[1:]]
    if words[0] in ("python", "python3"):
        return [sys.executable, *words[1:]]
    raise AssertionError(command)


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(command), cwd=cwd, capture_output=True, text=True)


@functools.cache
def _help(command: str) -> str:
    argv = [sys.executable, "-m", "bnexport", *([command] if command else []), "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout


def _help_flags(command: str) -> set[str]:
    flags = set()
    for line in _help(command).splitlines():
        match = re.match(r"  (-[a-z], )?(--[a-z0-9-]+)(?: / (--[a-z0-9-]+))?", line)
        if match:
            flags.update(f.rstrip(", ") for f in match.groups() if f)
    return flags - {"--help"}


def _knows(command: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _help(command)) is not None


# --- the README -------------------------------------------------------------------------


def test_quick_start_command_runs_as_written(tmp_path):
    section = _section(README, "Quick start")
    command = next(c for c in _block_commands(section, "bnexport fold") if not c.endswith(".onnx"))
    work = _workdir(tmp_path)
    done = _run(command, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: PASS" in done.stdout
    assert (work / "models" / "digits_cnn.onnx").is_file()
    shown = re.search(r"original (\d+\.\d+)%, ONNX (\d+\.\d+)%", section)
    measured = re.search(r"original (\d+\.\d+)%, ONNX (\d+\.\d+)%", done.stdout)
    assert shown and measured and shown.groups() == measured.groups()
    printed = done.stdout.splitlines()
    assert printed[0] == "verify: PASS - models/digits_cnn.onnx: exported and verified (exit 0)"
    rows = [_cells(line) for line in printed]
    for line in _output_block(section):
        if line.startswith(("┏", "┡", "└")):
            continue  # a border of a drawn table
        if line.startswith(("┃", "│")):
            assert _cells(line) in rows, line  # piped, the same row as plain text
        else:
            assert line in printed, line
    assert "Traceback" not in done.stderr


def test_quick_start_onnx_command_runs_as_written(tmp_path):
    section = _section(README, "Quick start")
    command = next(c for c in _block_commands(section, "bnexport fold") if c.endswith(".onnx"))
    work = _workdir(tmp_path)
    done = _run(command, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BatchNorm: 4 before, 0 after (4 folded); 1 shift kept as Add node" in done.stdout
    accuracy = f"{100 * _metrics()['digits_cnn']['test_accuracy']:.2f}%"
    assert f"original {accuracy}, ONNX {accuracy}" in done.stdout and accuracy in section
    assert (work / "models" / "digits_cnn.unfolded.folded.onnx").is_file()
    shown = _output_block(section[section.index(command) :])
    assert "BatchNorm: 4 before, 0 after (4 folded); 1 shift kept as Add node" in shown
    printed = done.stdout.splitlines()
    for line in shown:
        if line != "...":
            assert line in printed, line


def test_install_and_test_commands_match_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    install = next(
        line.strip() for line in _section(README, "Install").splitlines() if "pip install" in line
    )
    test = next(
        line.strip()
        for line in _section(README, "Running the tests").splitlines()
        if "pytest" in line
    )
    assert install in ci
    assert test.split()[:4] == ["python3", "-m", "pytest", "-q"]
    assert "python3 -m pytest -q" in ci


def test_readme_commands_table_names_every_command_and_real_flags():
    rows = [
        line
        for line in _section(README, "Commands").splitlines()
        if line.startswith("| `bnexport ")
    ]
    named = [re.match(r"\| `bnexport (\w+)", row).group(1) for row in rows]
    listed = re.findall(r"^  (\w+)\s{2,}", _help("").split("Commands:")[1], re.M)
    assert sorted(named) == sorted(listed) == sorted(COMMANDS)
    for command, row in zip(named, rows):
        flags = FLAG.findall(row)
        assert flags, row
        for flag in flags:
            assert _knows(command, flag), f"{flag} is not an option of bnexport {command}"


def test_help_and_version_answer():
    for argv in (["--help"], ["--version"]):
        done = subprocess.run(
            [sys.executable, "-m", "bnexport", *argv], capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert "bnexport --help" in README.read_text() + (DOCS / "cli.md").read_text()


# --- docs/ --------------------------------------------------------------------------------


def test_deploy_snippet_runs_on_the_exported_file(tmp_path):
    section = _section(DOCS / "cli.md", "Deploying the exported file")
    (command,) = _block_commands(section, "bnexport fold")
    work = _workdir(tmp_path)
    done = _run(command, work)
    assert done.returncode == 0, done.stdout + done.stderr
    code = _python_block(section)
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"accuracy 0\.9\d+ on 450 held-out digits", done.stdout)


def test_python_api_example_runs(tmp_path):
    code = _python_block(_section(DOCS / "python-api.md", "Example"))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "True" in done.stdout and (tmp_path / "net.onnx").is_file()


def test_stale_model_commands_run_as_written(tmp_path):
    section = _section(DOCS / "statistics.md", "Recalibrating the statistics")
    commands = [c for c in _block_commands(section, "bnexport ") if "models/digits_cnn_stale" in c]
    assert [c.split()[1] for c in commands] == ["inspect", "recalibrate", "fold"]
    work = _workdir(tmp_path)
    outputs = []
    for command in commands:
        done = _run(command, work)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    assert "stale: 4 of 4 BNs" in outputs[0]
    shown = re.search(r"(\d+\.\d+)% -> (\d+\.\d+)%", section).groups()
    assert f"before {shown[0]}%, after {shown[1]}%" in outputs[1]
    # the held-out accuracy of the recalibrated model, from its own outputs in PyTorch
    import numpy as np
    import torch

    models = work / "models"
    held_out = np.load(models / "digits_cnn_stale_test.npz")
    program = torch.export.load(str(models / "digits_cnn_stale.recalibrated.pt2"))
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(held_out["x"]))
    correct = logits.argmax(1).numpy() == held_out["labels"]
    accuracy = f"{100 * correct.mean():.2f}%"
    assert f"{len(correct)} labelled samples: original {accuracy}, ONNX {accuracy}" in outputs[2]
    assert f"accuracy {accuracy} (original and ONNX alike)" in " ".join(section.split())


def test_float16_command_runs_as_written(tmp_path):
    section = _section(DOCS / "float16.md", "Deploying in float16")
    (command,) = _block_commands(section, "bnexport fold")
    work = _workdir(tmp_path)
    done = _run(command, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: PASS" in done.stdout
    assert (work / command.split("-o ")[1].split()[0]).is_file()
    row = next(line for line in section.splitlines() if line.startswith("| digits_cnn "))
    shown_share = float(row.split("|")[5].strip().rstrip("%"))
    measured = re.search(r"([\d.]+)% of the weight bytes are float16", done.stdout)
    assert measured and float(measured.group(1)) == pytest.approx(shown_share)


@pytest.mark.slow
def test_model_building_commands_run_as_written(tmp_path):
    """`python -m models.train` (fixed seed) rebuilds the shipped models with the recorded
    metrics; `models.unfolded` and `models.train_stale` run too (in a copy of models/)."""
    commands = list(dict.fromkeys(c for _, c in _all_shown() if _kind(c) == "models"))
    assert {c.split()[-1] for c in commands} == {
        "models.train",
        "models.unfolded",
        "models.train_stale",
    }
    order = ["models.train", "models.unfolded", "models.train_stale"]
    commands.sort(key=lambda c: order.index(c.split()[-1]))
    work = _workdir(tmp_path)
    (work / "models" / "metrics.json").unlink()
    for command in commands:
        done = _run(command, work)
        assert done.returncode == 0, done.stdout + done.stderr
    rebuilt = json.loads((work / "models" / "metrics.json").read_text())
    shipped = json.loads((ROOT / "models" / "metrics.json").read_text())
    assert rebuilt.keys() == shipped.keys()
    for name, metrics in shipped.items():
        for key, value in metrics.items():
            if isinstance(value, float):
                assert rebuilt[name][key] == pytest.approx(value, rel=1e-3), (name, key)
            else:
                assert rebuilt[name][key] == value, (name, key)
    for name in ("digits_cnn", "tabular_mlp", "digits_autoencoder"):
        assert (work / "models" / f"{name}.unfolded.onnx").is_file()
    assert (work / "models" / "digits_cnn_stale.pt2").is_file()


# --- every page ---------------------------------------------------------------------------


def test_every_shown_command_is_tested():
    shown = _all_shown()
    untested = [f"{page}: {c}" for page, c in shown if _kind(c) is None]
    assert untested == [], "commands shown but not tested (add a test and RUN_AS_WRITTEN)"
    stale = set(RUN_AS_WRITTEN) - {c for _, c in shown}
    assert stale == set(), "RUN_AS_WRITTEN names commands no page shows"
    for tests in RUN_AS_WRITTEN.values():
        for name in tests:
            assert callable(globals().get(name)), name
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(c in ci for c in CI_COMMANDS)


def test_synopses_name_only_real_flags():
    """Every flag in a synopsis (`bnexport fold MODEL [-o OUT.onnx] ...`) or in a table row
    naming a command is an option of that command."""
    checked = 0
    for page in PAGES:
        for command in shown_commands(page):
            rest = _bnexport_words(command)
            if rest is None or not rest or rest[0] not in COMMANDS:
                continue
            for flag in FLAG.findall(" ".join(rest[1:])):
                assert _knows(rest[0], flag), f"{page.name}: {flag} in {command!r}"
                checked += 1
        for row in page.read_text().splitlines():
            match = re.match(r"\| `bnexport (\w+)", row)
            if match and match.group(1) in COMMANDS:
                for flag in FLAG.findall(row):
                    assert _knows(match.group(1), flag), f"{page.name}: {flag} in {row!r}"
                    checked += 1
    assert checked > 20


def test_cli_reference_lists_every_flag():
    """docs/cli.md names every option of every command, and its options table names only
    options of `fold`."""
    reference = (DOCS / "cli.md").read_text()
    for command in COMMANDS:
        for flag in _help_flags(command):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", reference), (
                f"bnexport {command} {flag} is not in docs/cli.md"
            )
    table = [
        line
        for line in _section(DOCS / "cli.md", "Options of fold and verify").splitlines()
        if line.startswith("| `-")
    ]
    assert len(table) > 10
    for row in table:
        for flag in FLAG.findall(row.split("|")[1]):
            assert _knows("fold", flag), row


def test_benchmark_commands_name_real_scripts_and_flags():
    """The benchmark scripts take minutes (test_benchmark_smoke runs them in quick mode):
    each one shown exists, and every flag shown with it is one of its options."""
    commands = [c for _, c in _all_shown() if _kind(c) == "benchmark"]
    assert len(commands) >= 5
    for command in commands:
        script = ROOT / command.split()[1]
        assert script.is_file(), command
        source = script.read_text()
        for flag in FLAG.findall(" ".join(command.split()[2:])):
            assert f'"{flag}"' in source, command


def test_install_commands_name_real_extras():
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", block, re.M))
    commands = [c for _, c in _all_shown() if _kind(c) == "extras"]
    assert commands
    for command in commands:
        named = re.findall(r"\[([\w,-]+)\]", command)
        assert named, command
        for extra in ",".join(named).split(","):
            assert extra in extras, command


def test_lint_command_runs_as_written():
    commands = {c for _, c in _all_shown() if _kind(c) == "lint"}
    assert commands == {"ruff check . && ruff format --check ."}
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not on PATH (the test extra installs it)")
    (command,) = commands
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
