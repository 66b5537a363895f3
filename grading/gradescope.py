"""The Gradescope autograder's run: grade /autograder/submission, write /autograder/results/results.json.

    python -m grading.gradescope [--root /autograder]      # run by run_autograder, as root

Runs from the autograder zip (grading.autograder builds it), where this package sits inside the
student handout beside the hidden recorded cases and autograder.json (the settings): no solution
source is on the machine. The submission is graded as the local grader does (grading.grader), its
four files found in any layout it accepts (flat, in models/ and utils/, in a sub-folder, or in one
.zip inside the upload). Gradescope's format: one test per snippet and one for the smoke run, each
with name, score, max_score, status, output and visibility; the total, execution_time and an output
for the whole submission.
"""
import argparse
import json
import os
import sys
import time

import torch

from grading import REPO, GradingError
from grading.grader import SMOKE, grade, locate_files
from utils.fileio import write_text_atomic

CASES_FILE = "hidden_cases.pt"
SETTINGS_FILE = "autograder.json"
VISIBILITIES = ("visible", "hidden", "after_due_date", "after_published")


def submission_path(folder):
    """The folder itself, or the one .zip inside it when the folder holds none of the four files."""
    found, _ = locate_files(folder)
    if found:
        return folder
    archives = sorted(os.path.join(current, name) for current, _, names in os.walk(folder)
                      for name in names if name.lower().endswith(".zip"))
    return archives[0] if len(archives) == 1 else folder


def results_json(report, settings, seconds):
    """Gradescope's results.json for one graded report."""
    tests = []
    for number, check in enumerate(report["checks"], 1):
        name = "smoke run: the whole model trains and decodes" if check["name"] == SMOKE else \
            f"{check['name']} ({check['file']})"
        tests.append({"name": name, "number": str(number), "score": check["points"], "max_score": check["max_points"],
                      "status": "passed" if check["passed"] else "failed", "output": check["message"],
                      "visibility": settings["visibility"]})
    found = [note for note in report["notes"]] or ["All four files were found."]
    shown = {"visible": "now", "hidden": "never (only to the instructors)", "after_due_date": "after the due date",
             "after_published": "once the grades are published"}[settings["visibility"]]
    output = "\n".join(found + [f"The result of each check is shown {shown}."])
    return {"score": report["total"], "execution_time": round(seconds, 1), "output": output,
            "stdout_visibility": "hidden", "tests": tests}


def failed_results(message, seconds):
    return {"score": 0, "execution_time": round(seconds, 1), "stdout_visibility": "hidden", "tests": [],
            "output": f"The autograder could not grade this submission ({message}); please tell the instructors."}


def run(root):
    started = time.monotonic()
    results = os.path.join(root, "results")
    os.makedirs(results, exist_ok=True)
    cases_path = os.path.join(REPO, CASES_FILE)
    try:
        if os.getuid() == 0:  # the children run as other users: only root reads the answers and writes results
            os.chown(results, 0, 0)
            os.chmod(results, 0o755)
            os.chown(cases_path, 0, 0)
            os.chmod(cases_path, 0o600)
        with open(os.path.join(REPO, SETTINGS_FILE)) as f:
            settings = json.load(f)
        cases = torch.load(cases_path, weights_only=True)
        submission = os.path.join(root, "submission")
        report = grade([submission_path(submission)], timeout=settings["timeout"], cases=cases, source=REPO,
                       hide=[cases_path, results], names=["submission"])[0]
        data, code = results_json(report, settings, time.monotonic() - started), 0
        print(json.dumps(report, indent=2))
    except (GradingError, OSError) as error:
        data, code = failed_results(str(error), time.monotonic() - started), 2
        print(f"error: {error}", file=sys.stderr)
    write_text_atomic(os.path.join(results, "results.json"), json.dumps(data, indent=2) + "\n")
    return code


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/autograder", help="Gradescope's folder (default /autograder)")
    args = parser.parse_args(argv)
    return run(os.path.abspath(args.root))


if __name__ == "__main__":
    sys.exit(main())
