"""The commands in README.md and docs/*.md work: each is checked against the tool's command line (the
script or module exists, every --flag is one it takes, config files and keys exist, make targets are
real), and the README's Quickstart and its block from the best snapshot to the report are run."""
import functools
import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from configs.defaults import get_cfg_defaults
from tests.helpers import ROOT, write_cfg

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
COMMANDS = {"python", "make", "torchrun", "$", "sudo"}  # the first word of a command line


def read(name):
    with open(os.path.join(ROOT, name)) as handle:
        return handle.read()


def commands(name):
    """The command lines of a Markdown file: lines of code blocks, and inline code starting with a command."""
    text = read(name)
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        found += [line.strip() for line in joined.splitlines()]
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span.strip() for span in re.findall(r"`([^`\n]+)`", outside)]
    return [line for line in found if line.split() and line.split()[0] in COMMANDS]


@functools.lru_cache(maxsize=None)
def help_text(*program):
    done = subprocess.run([sys.executable, *program, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (program, done.stderr[-1000:])
    return done.stdout


def config_keys():
    keys = set()

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            else:
                keys.add(prefix + key)

    walk(get_cfg_defaults())
    return keys


# The tools that take KEY VALUE config overrides after their flags.
WITH_OVERRIDES = {"train.py", "test.py", "scripts/visualize.py", "scripts/make_report.py", "research/benchmark.py",
                  "research/ablate.py", "research/probe_encoder.py", "utils.dataset"}


def check_arguments(words, help_output, where, overrides):
    keys = config_keys() if overrides else set()
    for index, word in enumerate(words):
        if word.startswith("--"):
            flag = word.split("=")[0]
            assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", help_output), f"{where}: {flag} is not an option"
            if flag == "--cfg" and index + 1 < len(words) and not words[index + 1].startswith("$"):
                assert os.path.isfile(os.path.join(ROOT, words[index + 1])), f"{where}: no config {words[index + 1]}"
        elif overrides and re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", word) and index + 1 < len(words):
            previous = words[index - 1] if index else ""
            if not previous.startswith("--") or previous in ("--gpu",):
                assert word in keys, f"{where}: {word} is not a config key"


def check_command(line, where):
    line = re.sub(r"^\$ ", "", line.split(" #")[0]).strip()
    if re.search(r"<\w+>|\.\.\.", line):
        return  # a pattern (`python scripts/<tool>.py`, `train.py --cfg ...`), not a command
    words = shlex.split(line)
    if words[:1] == ["sudo"]:
        words = words[words.index("python"):]
    if words[0] == "make":
        makefile = read("Makefile")
        for target in words[1:]:
            if "=" not in target:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no make target {target}"
        return
    if words[0] == "torchrun":
        words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
    if words[1] == "-m":
        module = words[2]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if module.startswith(("utils.", "scripts.", "research.", "tests.")):
            check_arguments(words[3:], help_text("-m", module), where, module in WITH_OVERRIDES)
        return
    script = words[1]
    if script.startswith("$") or script.endswith(".py") is False:
        return
    assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script} does not exist"
    check_arguments(words[2:], help_text(script), where, script in WITH_OVERRIDES)


@pytest.mark.parametrize("name", DOCS)
def test_every_command_is_one_the_tools_take(name):
    found = commands(name)
    if name == "README.md":
        assert len(found) > 15
    for line in found:
        check_command(line, f"{name}: {line}")


def test_readme_is_short_and_for_students_first():
    text = read("README.md")
    assert len(text.splitlines()) <= 320
    first_screen = "\n".join(text.splitlines()[:30])
    pointers = ["Students"]
    if os.path.exists(os.path.join(ROOT, "docs", "instructors.md")):  # not in the student handout
        pointers += ["Instructors", "docs/instructors.md", "docs/development.md"]
    for pointer in pointers:
        assert pointer in first_screen, pointer


def test_quickstart_is_make_demo_and_make_test():
    section = read("README.md").split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.splitlines() if line.strip()] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    ci_commands = [line.strip() for line in read(".ci/run").splitlines()
                   if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_commands[0] == "make test"
    makefile = read("Makefile")
    assert "scripts/demo.py" in re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "-m pytest" in re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert re.search(r"^demo: setup", makefile, re.M) and re.search(r"^test: setup", makefile, re.M)


def student_block():
    section = read("README.md").split("## 6. Testing", 1)[1].split("\n## ", 1)[0]
    lines = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert lines[0].startswith("CFG=") and "EXP=" in lines[0] and "DATA=" in lines[0]
    demo = re.search(r"`(CFG=configs/dynamic/transformer_demo.yaml [^`]+)`", section).group(1)
    return lines[1:], demo


@pytest.mark.snippets
def test_the_readme_block_from_the_best_snapshot_to_the_report_runs_as_printed(tiny_experiment, tmp_path):
    lines, demo = student_block()
    assert demo == "CFG=configs/dynamic/transformer_demo.yaml EXP=experiments/demo DATA=data/demo"
    # The block as the demo runs it, on a copy of the tiny experiment in place of the demo's files.
    exp_root = str(tmp_path / "experiments" / "tiny")
    shutil.copytree(tiny_experiment["exp_root"], exp_root)
    cfg = tiny_experiment["cfg"].clone()
    cfg.defrost()
    cfg.exp_dir = str(tmp_path / "experiments")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CFG": write_cfg(cfg, tmp_path), "EXP": exp_root,
           "DATA": tiny_experiment["data"]["root"]}
    for line in lines:
        done = subprocess.run(["bash", "-c", line.replace("python ", f"{sys.executable} ", 1)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (line, done.stderr[-2000:])
    assert os.path.isfile(os.path.join(exp_root, "report", "report.html"))
    assert glob.glob(os.path.join(exp_root, "figures", "triplet_test_*.png"))
