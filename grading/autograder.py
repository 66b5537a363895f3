"""Build the Gradescope autograder zip (docs/instructors.md, "Gradescope").

    python -m grading.autograder build --out autograder.zip [--visibility after_published] [--timeout 60]

The zip holds, at its root, setup.sh (run once by Gradescope as root on its Ubuntu image: a Python
environment with the CPU build of torch and what the grader imports) and run_autograder (run per
submission: python -m grading.gradescope), and project/: the student handout, the grader's runtime
modules (RUNTIME), the hidden recorded cases and autograder.json (the settings). No solution source:
the build checks that no line of a solution appears in any file it packs.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile

from grading import REPO, GradingError
from grading.gradescope import CASES_FILE, SETTINGS_FILE, VISIBILITIES
from grading.handout import record_cases, write_handout
from grading.snippets import read_text, solution_lines

# The grader's modules that run on Gradescope; the recorder and the mistakes quote the solution and stay here.
RUNTIME = ("grading/__init__.py", "grading/snippets.py", "grading/child.py", "grading/sandbox.py",
           "grading/grader.py", "grading/gradescope.py")
# What the grader and the handout's packages import, besides torch (installed from the CPU index).
REQUIREMENTS = ("numpy", "pyyaml", "yacs", "tqdm")
VENV = "/opt/scorer-grader"  # readable by every user: the sandboxed children run Python from it

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (Ubuntu): a Python
# environment that the sandbox's unprivileged users can read, with the CPU build of torch.
set -euo pipefail
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip
python3 -m venv {venv}
{venv}/bin/pip install --upgrade pip
{venv}/bin/pip install --index-url https://download.pytorch.org/whl/cpu "{torch}"
{venv}/bin/pip install -r /autograder/source/requirements-grading.txt
chmod -R a+rX {venv}
chmod 600 /autograder/source/project/{cases}
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this once per submission, as root: grades /autograder/submission and writes
# /autograder/results/results.json. AUTOGRADER_ROOT and AUTOGRADER_PYTHON are for testing it elsewhere.
set -euo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PYTHON="${{AUTOGRADER_PYTHON:-{venv}/bin/python}}"
cd "$ROOT/source/project"
PYTHONPATH="$ROOT/source/project" exec "$PYTHON" -m grading.gradescope --root "$ROOT"
"""


def requirement_lines(names, root=REPO):
    """The lines of requirements.txt for the distributions ``names`` (their version ranges stay in one place)."""
    found = {}
    for line in read_text(os.path.join(root, "requirements.txt")).splitlines():
        name = re.match(r"\s*([A-Za-z0-9_.-]+)", line.split("#")[0])
        if name and name.group(1).lower() in names:
            found[name.group(1).lower()] = line.strip()
    missing = [name for name in names if name not in found]
    if missing:
        raise GradingError(f"requirements.txt has no line for {', '.join(missing)}, which the grader needs")
    return [found[name] for name in names]


def _write(path, text, mode=0o644):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.chmod(path, mode)


def _check_no_solution(folder, root):
    lines = [line.encode() for line in solution_lines(root)]
    for current, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(current, name), "rb") as f:
                content = f.read()
            leaked = next((line for line in lines if line in content), None)
            if leaked:
                rel = os.path.relpath(os.path.join(current, name), folder)
                raise GradingError(f"the autograder's {rel} holds the solution line {leaked.decode()!r}; "
                                   f"keep solution source out of the zip")


def build(out, visibility="after_published", timeout=60.0, root=REPO):
    """Writes the autograder zip to ``out``; returns the names it holds."""
    if visibility not in VISIBILITIES:
        raise GradingError(f"--visibility {visibility} is not one of {', '.join(VISIBILITIES)}")
    out = os.path.abspath(out)
    staging = tempfile.mkdtemp(prefix=".autograder-")
    try:
        project = os.path.join(staging, "project")
        write_handout(project, root)
        for rel in RUNTIME:
            os.makedirs(os.path.dirname(os.path.join(project, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(root, rel), os.path.join(project, rel))
        record_cases("hidden", os.path.join(project, CASES_FILE), root)
        _write(os.path.join(project, SETTINGS_FILE), json.dumps({"visibility": visibility, "timeout": timeout}) + "\n")
        torch_line, *others = requirement_lines(("torch",) + REQUIREMENTS, root)
        _write(os.path.join(staging, "requirements-grading.txt"), "\n".join(others) + "\n")
        _write(os.path.join(staging, "setup.sh"), SETUP.format(venv=VENV, torch=torch_line, cases=CASES_FILE), 0o755)
        _write(os.path.join(staging, "run_autograder"), RUN.format(venv=VENV), 0o755)
        _check_no_solution(staging, root)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=".autograder-", suffix=".zip", dir=os.path.dirname(out))
        os.close(handle)
        names = []
        try:
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for current, dirs, files in os.walk(staging):
                    dirs.sort()
                    for name in sorted(files):
                        path = os.path.join(current, name)
                        names.append(os.path.relpath(path, staging).replace(os.sep, "/"))
                        archive.write(path, names[-1])
            os.replace(partial, out)
        except BaseException:
            os.remove(partial)
            raise
        return names
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write the autograder zip")
    make.add_argument("--out", required=True, help="the zip to write, e.g. autograder.zip")
    make.add_argument("--visibility", default="after_published", choices=VISIBILITIES,
                      help="when students see each check's result (default: after_published)")
    make.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per check (default 60)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        names = build(args.out, args.visibility, args.timeout)
    except GradingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(names)} files); upload it as the autograder of a Gradescope programming assignment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
