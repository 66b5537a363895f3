"""Recorded cases of the six snippets: running a snippet on a case's inputs, and explaining how its
results differ from the recorded ones.

A case holds inputs (tensors, a config, a mask...), the module's weights and the output cotangents,
and, recorded from the solution: the outputs, the gradients with respect to the inputs and every
parameter, the shapes self.dropout was applied to, and the outputs of known mistakes, each with its
hint. Both the handout's `make snippets` (tests/test_snippets.py, on tests/snippet_cases.pt) and the
instructors' grader (on hidden cases of other sizes and seeds) compute results here and judge
them with explain(): tensors are compared, so no formula of a snippet is written down anywhere.

Training-mode cases replace self.dropout by FixedMaskDropout, whose masks depend only on the case,
so that where dropout is applied is checked exactly, on any machine (torch's own dropout draws
different masks on different CPU builds).
"""
import os
import traceback

import torch
import torch.nn as nn

from configs.defaults import load_config
from utils.assignment import ASSIGNMENT_FILES

CASES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snippet_cases.pt")
RTOL = ATOL = 1e-4  # float32: other correct formulas differ by about 1e-6, mistakes by far more
# The keys of a case that the code under test may see; the others are the recorded answers.
INPUT_KEYS = ("what", "config", "shape", "offset", "mask", "train", "seed", "inputs", "weights", "cotangents")

# (label, names of its axes) of each output, in the order run() returns them.
OUTPUTS = {
    "CBR.CrossEn": [("the loss", ())],
    "utils.CrossEn": [("the loss", ())],
    "PositionEncoding": [("the table pe", ("position", "column")),
                         ("the forward's output", ("batch", "position", "column"))],
    "SelfAttention": [("the output", ("batch", "position", "column"))],
    "CrossAttention": [("the context", ("batch", "position", "column")),
                       ("the returned head average of the scores", ("batch", "position", "grid token"))],
    "Attention": [("the output", ("batch", "token", "column")),
                  ("the attention map", ("batch", "query token", "key token"))],
}


class FixedMaskDropout(nn.Module):
    """Stands in for self.dropout in training-mode cases: inverted dropout with masks computed from
    the case's seed, the call's position and the element's index, and a list of the shapes it saw."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed, self.calls = p, seed, []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        if not self.training or self.p == 0:
            return x
        index = torch.arange(x.numel(), dtype=torch.int64)
        scrambled = (index * 2654435761 + (self.seed * 97 + len(self.calls)) * 40503) % 1000003
        keep = (scrambled % 1000 >= round(self.p * 1000)).view(x.shape)
        return x * keep.to(x.dtype) / (1 - self.p)


def snippet_class(name):
    """The class of snippet ``name`` from the files of this checkout."""
    if name == "CBR.CrossEn":
        from models.CBR import CrossEn
        return CrossEn
    if name == "utils.CrossEn":
        from utils.utils import CrossEn
        return CrossEn
    if name == "Attention":
        from models.SCORER import Attention
        return Attention
    from models import transformer_decoder
    return getattr(transformer_decoder, name)


def build_module(name, case, cls=None):
    """The module of snippet ``name`` (from ``cls``, by default this checkout's class) set up for the case."""
    cls = cls or snippet_class(name)
    if name.endswith("CrossEn"):
        return cls()
    if name == "PositionEncoding":
        return cls(*case["shape"])
    module = cls(load_config(None, case["config"]))
    module.load_state_dict(case["weights"])
    if name == "Attention":
        module.mtm.when = "never"  # the snippet is the reconstruction; S lies outside it (models/mtm.py)
    if not case.get("train"):
        return module.eval()
    module.dropout = FixedMaskDropout(module.dropout.p, case["seed"])
    return module.train()


def run(name, module, inputs, case):
    """The snippet's outputs (a tuple, as listed in OUTPUTS) for the case's inputs."""
    if name.endswith("CrossEn"):
        return (module(inputs["sim_matrix"]),)
    if name == "PositionEncoding":
        return (module.pe, module(inputs["x"], case["offset"]))
    if name == "SelfAttention":
        keys = inputs.get("key_states", inputs["query_states"])
        return (module(inputs["query_states"], keys, keys, case["mask"]),)
    if name == "CrossAttention":
        return tuple(module(inputs["query_states"], inputs["grid_states"], inputs["grid_states"]))
    output, _, attention_map = module(inputs["query_states"], inputs["key_states"], inputs["key_states"])
    return output, attention_map


def outputs_and_gradients(name, module, case, gradients=True):
    """(outputs, {input or parameter: gradient}) for the case's inputs and output cotangents.

    The gradients are None when not asked for, or when an output is not a tensor of its cotangent's
    shape: explain() then reports the shape, instead of the arithmetic failing here.
    """
    inputs = {k: v.clone().requires_grad_() for k, v in case["inputs"].items()}
    outputs = run(name, module, inputs, case)
    if not isinstance(outputs, tuple):
        return outputs, None
    shapes_match = len(outputs) == len(case["cotangents"]) and all(
        torch.is_tensor(o) and o.shape == c.shape for o, c in zip(outputs, case["cotangents"]))
    if not (gradients and shapes_match):
        return outputs, None
    live = [(o, c) for o, c in zip(outputs, case["cotangents"]) if o.requires_grad]
    wrt = dict(inputs, **{f"parameter {k}": p for k, p in module.named_parameters()})
    grads = torch.autograd.grad(sum((o * c.to(o.dtype)).sum() for o, c in live), list(wrt.values()),
                                allow_unused=True) if live else [None] * len(wrt)
    return outputs, dict(zip(wrt, grads))


def _portable(value):
    """A tensor as it is (detached), anything else as the name of its type: what torch.load(weights_only) reads."""
    return value.detach().clone() if torch.is_tensor(value) else type(value).__name__


def compute(name, case, cls=None, gradients=True):
    """The results of the snippet on the case: {"outputs", "gradients", "dropout"} (see explain)."""
    module = build_module(name, case, cls)
    outputs, gradients = outputs_and_gradients(name, module, case, gradients)
    dropout = getattr(module, "dropout", None)
    return {"outputs": [_portable(o) for o in outputs] if isinstance(outputs, tuple) else _portable(outputs),
            "gradients": None if gradients is None else
            {k: g.detach().clone() for k, g in gradients.items() if g is not None},
            "dropout": list(dropout.calls) if isinstance(dropout, FixedMaskDropout) else None}


def _student_file(path):
    """The assignment file (e.g. "models/CBR.py") that ``path`` is, or None."""
    path = (path or "").replace(os.sep, "/")
    return next((rel for rel in ASSIGNMENT_FILES if path.endswith("/" + rel)), None)


def describe_error(error):
    """An exception of the code under test as part of a sentence, with the innermost line of an
    assignment file it passed through: "the code raises IndexError: ... (models/SCORER.py, line 75)"."""
    where = ""
    if isinstance(error, SyntaxError) and _student_file(error.filename):
        where = f" ({_student_file(error.filename)}, line {error.lineno})"
    else:
        for frame in reversed(traceback.extract_tb(error.__traceback__)):
            if _student_file(frame.filename):
                where = f" ({_student_file(frame.filename)}, line {frame.lineno})"
                break
    if isinstance(error, NotImplementedError):
        return f"not implemented: the code raises NotImplementedError{where}"
    text = str(error.msg if isinstance(error, SyntaxError) else error).strip().splitlines()
    detail = f": {text[0][:300]}" if text else ""
    return f"the code raises {type(error).__name__}{detail}{where}"


def answer_free(case):
    """The case without its recorded answers: what the code under test is given."""
    return {key: value for key, value in case.items() if key in INPUT_KEYS}


# ---------------------------------------------------------------- explaining a difference

def _shape(shape):
    return "a scalar" if len(shape) == 0 else f"shape ({', '.join(str(n) for n in shape)})"


def _tensors(shapes):
    """"a tensor of shape (2, 3)", "2 tensors of shape (2, 3) and (4,)" or "nothing"."""
    if not shapes:
        return "nothing"
    listed = " and ".join("(" + ", ".join(str(n) for n in shape) + ")" for shape in shapes)
    return f"{'a tensor' if len(shapes) == 1 else f'{len(shapes)} tensors'} of shape {listed}"


def _shape_cause(name, label, got, expected):
    """The usual reason an output has shape ``got`` instead of ``expected`` (both tuples), or None."""
    if not expected:
        return "the loss is one number: the mean over the rows of the similarity matrix"
    if len(got) == len(expected) + 1 and len(expected) == 3 and got[0] == expected[0]:
        if label == "the attention map" and got[2:] == expected[1:]:
            return "the map is not averaged over the heads (dim 1)"
        if got[2] == expected[1] and got[1] * got[3] == expected[2]:
            return ("the heads are not merged back: the context is (B, h, L, dh); move the head axis next "
                    "to dh (transpose(1, 2)) and reshape to (B, L, d)")
    if len(got) == 2 and tuple(reversed(got)) == tuple(expected) and name == "PositionEncoding":
        return "the table is transposed: rows are the max_len positions, columns the n_filters filters"
    if len(got) == len(expected) + 1 and got[0] == 1 and tuple(got[1:]) == tuple(expected):
        return "it has an extra leading axis of size 1"
    if got and expected and torch.Size(got).numel() == torch.Size(expected).numel():
        return "the numbers are laid out in another shape: look for a transpose or a view over the wrong axes"
    return None


def _where(index, axes):
    if not index:
        return ""
    if len(axes) != len(index):
        return " at index (" + ", ".join(str(i) for i in index) + ")"
    return " at " + ", ".join(f"{axis} {i}" for axis, i in zip(axes, index))


def sentence(text):
    """``text`` as a sentence: a capital first letter (unless it starts with a name such as
    models/CBR.py or self.dropout) and a full stop."""
    text = text.strip()
    if text.split(" ", 1)[0].isalpha():
        text = text[:1].upper() + text[1:]
    return text + ("" if text.endswith((".", "?", "!")) else ".")


def _same(got, candidate):
    return (torch.is_tensor(candidate) and candidate.shape == got.shape
            and torch.allclose(got, candidate.to(got.dtype), rtol=RTOL, atol=ATOL))


def _value_difference(label, axes, got, expected, case):
    """A sentence on the first difference between two tensors of equal shape, or None when they match."""
    if got.dtype != expected.dtype:
        if not got.is_floating_point():
            return (f"{label} has dtype {got.dtype} where the solution's is {expected.dtype}, "
                    f"for {case['what']}")
        got = got.to(expected.dtype)
    if not torch.isfinite(got).all():
        first = torch.nonzero(~torch.isfinite(got))[0].tolist() if got.dim() else []
        return f"{label} holds NaN or inf{_where(first, axes)} for {case['what']}"
    bad = ~torch.isclose(got, expected, rtol=RTOL, atol=ATOL)
    if not bad.any():
        return None
    if got.dim() == 0:
        return (f"{label} is {got.item():.6g} where the solution's is {expected.item():.6g}, "
                f"for {case['what']}")
    first = bad.nonzero()[0].tolist()
    largest = (got - expected).abs().max().item()
    return (f"{label} differs from the solution's{_where(first, axes)} (by up to {largest:.3g}) "
            f"for {case['what']}")


def _hint(index, got, case, earlier_passed, dropout):
    """The hint for output ``index`` differing: a known mistake it equals, else what the case suggests."""
    for mistake in case.get("mistakes", ()):
        outputs = mistake["outputs"]
        if index < len(outputs) and _same(got, outputs[index]):
            return mistake["hint"]
    expected_calls = case.get("dropout")
    if case.get("train") and dropout is not None and expected_calls is not None and dropout != expected_calls:
        return (f"dropout (self.dropout) was applied to {_tensors(dropout)}; the solution applies it to "
                f"{_tensors(expected_calls)} (the check replaces self.dropout with fixed masks to see where it "
                f"is applied, so call self.dropout rather than F.dropout)")
    if earlier_passed and case.get("fallback"):
        return case["fallback"]
    return case.get("hint")


def explain(name, case, result, earlier_passed=False):
    """None when ``result`` (from compute) matches the recorded case, else a sentence saying where it
    differs: the number and kinds of outputs, then every shape, then the values (with the hint of a
    known mistake the values equal), then the gradients. ``earlier_passed``: an earlier case of the
    same snippet matched, which makes the case's fallback hint apply."""
    if "error" in result:
        return sentence(f"{result['error']}, for {case['what']}")
    labels = OUTPUTS[name]
    outputs = result["outputs"]
    if not isinstance(outputs, list):
        return sentence(f"the forward returns a {outputs} instead of the {len(labels)} value(s) handed out; "
                         f"keep the return statement as it is")
    if len(outputs) != len(case["outputs"]):
        return sentence(f"the forward returns {len(outputs)} values where {len(case['outputs'])} are "
                         f"expected; keep the return statement as handed out")
    for (label, _), got in zip(labels, outputs):
        if not torch.is_tensor(got):
            return sentence(f"{label} is a {got}, not a tensor, for {case['what']}")
    for (label, _), got, expected in zip(labels, outputs, case["outputs"]):
        if got.shape != expected.shape:
            cause = _shape_cause(name, label, tuple(got.shape), tuple(expected.shape))
            text = (f"{label} has {_shape(got.shape)} where {_shape(expected.shape)} is expected, "
                    f"for {case['what']}")
            return sentence(text) + (" " + sentence(f"usually {cause}") if cause else "")
    for index, ((label, axes), got, expected) in enumerate(zip(labels, outputs, case["outputs"])):
        difference = _value_difference(label, axes, got, expected, case)
        if difference:
            hint = _hint(index, got, case, earlier_passed, result.get("dropout"))
            return sentence(difference) + (" " + sentence(hint) if hint else "")
    gradients = result["gradients"] or {}
    for key, expected in case["gradients"].items():
        got = gradients.get(key)
        if got is None:
            return sentence(f"no gradient reaches {key} for {case['what']}: the outputs match, but part of "
                             f"them is cut off from autograd (.detach(), .data, .item() or a new tensor)")
        if got.shape != expected.shape:
            return sentence(f"the gradient with respect to {key} has {_shape(got.shape)} where "
                             f"{_shape(expected.shape)} is expected, for {case['what']}")
        difference = _value_difference(f"the gradient with respect to {key}", (), got, expected, case)
        if difference:
            return sentence(difference) + " " + sentence(
                "the outputs match, so look for an operation autograd does not follow (an in-place "
                "change of a tensor that is needed later, or values copied through .data)")
    return None


def explain_all(name, cases, results):
    """(passed, message) for a snippet over its cases in order; the message names the first difference."""
    passed_any = False
    for case, result in zip(cases, results):
        difference = explain(name, case, result, passed_any)
        if difference:
            return False, difference
        passed_any = True
    modes = " in evaluation and training mode" if any(case.get("train") for case in cases) else ""
    return True, f"All {len(cases)} cases match, outputs and gradients{modes}."


def load():
    """The recorded cases: tests/snippet_cases.pt in the handout; recorded now in the full project."""
    if os.path.exists(CASES_FILE):
        return torch.load(CASES_FILE, weights_only=True)
    from grading.recorder import record  # the full project only: the recorder stays out of the handout

    return record("public")
