"""Instructor tooling: cut the student handout, record the snippet cases, grade submissions (locally
or as a Gradescope autograder).

Nothing here ships to students (see ``grading.snippets.HANDOUT_EXCLUDE``).
"""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GradingError(Exception):
    """Bad input for the handout or grading tools; the message says what and how to fix it."""


def exit_status(run):
    """Runs the body of an instructor tool: 0, or 2 after printing a GradingError as one line."""
    try:
        run()
    except GradingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def snippet_cases_module():
    """tests/snippet_cases.py beside this package: the handout's way of running and judging a snippet,
    which the grader shares. tests/ is not an installed package, so it is loaded from its file."""
    module = sys.modules.get("tests.snippet_cases")
    if module is None:
        spec = importlib.util.spec_from_file_location(
            "tests.snippet_cases", os.path.join(REPO, "tests", "snippet_cases.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["tests.snippet_cases"] = module
        spec.loader.exec_module(module)
    return module
