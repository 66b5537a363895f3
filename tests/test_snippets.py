"""The six snippets against recorded outputs and gradients of the solution (tests/snippet_cases.py).

`make snippets` runs this file and prints a table: which snippets match, which differ (where), which
are not written yet.
"""
import pytest
import torch

from tests import snippet_cases
from utils.assignment import SNIPPETS

RTOL = ATOL = 1e-4  # float32: other correct formulas differ by about 1e-6, mistakes by far more
CASES = snippet_cases.load()


def _compare(what, got, expected, case):
    assert torch.is_tensor(got), f"{what} is a {type(got).__name__}, not a tensor, for {case}"
    assert tuple(got.shape) == tuple(expected.shape), (
        f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}, for {case}")
    got = got.detach().to(expected.dtype)
    if not torch.isfinite(got).all():
        pytest.fail(f"{what} holds NaN or inf for {case}")
    bad = ~torch.isclose(got, expected, rtol=RTOL, atol=ATOL)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        pytest.fail(f"{what} differs at index {where} (max abs diff {(got - expected).abs().max().item():.3g}) "
                    f"for {case}")


@pytest.mark.snippets
@pytest.mark.parametrize("name", SNIPPETS)
def test_snippet_matches_the_recorded_solution(name, record_property):
    record_property("snippet", name)
    for case in CASES[name]:
        module = snippet_cases.build_module(name, case)
        outputs, gradients = snippet_cases.outputs_and_gradients(name, module, case)
        assert len(outputs) == len(case["outputs"]), f"the forward returns {len(outputs)} values, not {len(case['outputs'])}"
        labels = ["the table pe", "the output"] if name == "PositionEncoding" else ["the output", "the second output"]
        for label, got, expected in zip(labels, outputs, case["outputs"]):
            _compare(label, got, expected, case["what"])
        for key, expected in case["gradients"].items():
            assert gradients.get(key) is not None, f"no gradient reaches {key} for {case['what']}"
            _compare(f"the gradient w.r.t. {key}", gradients[key], expected, case["what"])
