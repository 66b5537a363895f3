"""Checks the hand-in and packs it: the four assignment files and the report, in one zip.

    python scripts/make_submission.py --cfg configs/dynamic/transformer_quick.yaml [--output submission.zip] [--force]
    make submission [CFG=configs/dynamic/transformer_quick.yaml]

Checks, in order: the four files compile; the six snippets are written and match the recorded cases
(`make snippets`); the experiment of --cfg has test scores (evaluate.py on test_output/captions), a
triplet figure (scripts/visualize.py) and a report (scripts/make_report.py) made after both. Anything
missing stops it with what to do; --force writes the zip anyway (a partial hand-in is better than
none), listing what is missing. The zip holds models/SCORER.py, models/CBR.py,
models/transformer_decoder.py, utils/utils.py and report.html, the layout the grader reads.
"""
import argparse
import os
import re
import subprocess
import sys
import zipfile

from configs.defaults import load_config
from utils.assignment import ASSIGNMENT_FILES, ROOT, missing_snippets
from utils.cli import parse_with_overrides, report_errors
from utils.errors import UserError
from utils.layout import REPORT_HTML, ExperimentLayout


class SubmissionError(UserError):
    """The hand-in is not complete; the message says what to do."""


def compile_errors(root=ROOT):
    """['models/CBR.py, line 16: invalid syntax', ...] of the assignment files that do not compile."""
    errors = []
    for rel in ASSIGNMENT_FILES:
        with open(os.path.join(root, rel), encoding="utf-8") as handle:
            source = handle.read()
        try:
            compile(source, rel, "exec")
        except (SyntaxError, ValueError) as err:
            where = f", line {err.lineno}" if getattr(err, "lineno", None) else ""
            errors.append(f"{rel}{where}: {getattr(err, 'msg', err)}")
    return errors


def snippet_problems(root=ROOT):
    """Sentences on the snippets still to write or that differ from the recorded cases (`make snippets`)."""
    missing = missing_snippets(root)
    if missing:
        return [f"{len(missing)} snippet(s) are not written yet: " + ", ".join(f"{n} ({p})" for n, p in missing)]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_snippets.py"],
                          cwd=root, capture_output=True, text=True)
    if done.returncode == 0:
        return []
    table = re.search(r"=+ snippets =+\n(.*?)(?:\n=|\Z)", done.stdout, re.S)
    wrong = [line.strip() for line in (table.group(1).splitlines() if table else [])
             if line.strip() and not line.rstrip().endswith("matches the solution")]
    return [f"snippet {line}" for line in wrong] or [f"`make snippets` fails (exit {done.returncode}); run it to see why"]


def report_problems(cfg, cfg_path):
    """What the experiment lacks for the report: test scores, a triplet figure, a report made after them."""
    layout = ExperimentLayout.of(cfg)
    root, scores, figures, report = layout.root, layout.test_scores, layout.figure_index, layout.report_html
    problems = []
    if not os.path.isfile(scores):
        problems.append(f"no test scores in {root} ({scores}): run python test.py --cfg {cfg_path} --snapshot best, "
                        f"then evaluate.py on {layout.test_captions} (README, section 6)")
    if not os.path.isfile(figures):
        problems.append(f"no triplet figure in {layout.figures}: run python scripts/visualize.py --cfg {cfg_path} "
                        f"--snapshot best --per_type 1 --attention")
    if not os.path.isfile(report):
        problems.append(f"no report ({report}): run python scripts/make_report.py --cfg {cfg_path}")
    elif any(os.path.isfile(p) and os.path.getmtime(p) > os.path.getmtime(report) for p in (scores, figures)):
        problems.append(f"{report} is older than the test scores or the figures it should show: run python "
                        f"scripts/make_report.py --cfg {cfg_path} again")
    return problems, report


def write_zip(path, report):
    """The four files and report.html, written under a temporary name and renamed."""
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in ASSIGNMENT_FILES:
            archive.write(os.path.join(ROOT, rel), rel)
        if os.path.isfile(report):
            archive.write(report, REPORT_HTML)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config of the experiment whose report goes in")
    parser.add_argument("--output", default="submission.zip", help="the zip to write (default submission.zip)")
    parser.add_argument("--force", action="store_true", help="write the zip although something is missing")
    args = parse_with_overrides(parser, argv)

    def run():
        cfg = load_config(args.cfg, args.opts)
        broken = compile_errors()
        problems = [f"{error}: fix it so that the file compiles" for error in broken]
        if not broken:
            problems += snippet_problems()
        found, report = report_problems(cfg, args.cfg)
        problems += found
        if problems and not args.force:
            raise SubmissionError("the hand-in is not complete: " + "; ".join(problems)
                                  + ". (--force writes the zip anyway)")
        write_zip(args.output, report)
        for problem in problems:
            print(f"warning: {problem}")
        print(f"wrote {args.output}: {', '.join(ASSIGNMENT_FILES)}"
              + (f" and {REPORT_HTML}" if os.path.isfile(report) else " (no report)")
              + ("; hand it in" if not problems else f"; {len(problems)} problem(s) above"))

    report_errors(run)


if __name__ == "__main__":
    main()
