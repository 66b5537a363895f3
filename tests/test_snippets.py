"""The six snippets against the solution's recorded outputs and gradients (tests/snippet_cases.py).

`make snippets` runs this file and prints a table: which snippets match, which differ (a sentence
on the first difference, with a hint when it is a known mistake), which are not written yet.
"""
import pytest

from tests import snippet_cases
from utils.assignment import SNIPPETS

CASES = snippet_cases.load()


@pytest.mark.snippets
@pytest.mark.parametrize("name", SNIPPETS)
def test_snippet_matches_the_recorded_solution(name, record_property):
    record_property("snippet", name)
    passed_any = False
    for case in CASES[name]:
        try:
            result = snippet_cases.compute(name, snippet_cases.answer_free(case))
        except NotImplementedError:
            raise  # reported as "not implemented yet" (tests/conftest.py)
        except Exception as error:  # pytest shows its traceback; the table gets a sentence
            pytest.fail(snippet_cases.explain(name, case, {"error": snippet_cases.describe_error(error)}))
        difference = snippet_cases.explain(name, case, result, passed_any)
        if difference:
            pytest.fail(difference)
        passed_any = True
