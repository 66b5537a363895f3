"""The grader's checks. Each runs in a child process (grading.runner) on one student file.

A snippet check builds the module from the student's file and from the project's own (reference)
file with the same weights, runs both on random inputs of several sizes, and compares outputs and
gradients (inputs and parameters). Only the student's file under test is loaded from the
submission; whatever it imports (e.g. models.SCORER from models/CBR.py) is the reference, so a
mistake in one file never costs a snippet in another. The smoke run trains the whole model built
from the submission's four files for a few steps on a fixed random batch.

A check passes by returning a short note and fails by raising Mismatch (or any student error).
"""
import importlib.util
import math
import sys

import torch
import torch.nn.functional as F

# Tolerances for float32: alternative correct formulas differ by ~1e-6, the mistakes by > 1e-2.
RTOL = ATOL = 1e-4

REFERENCE_MODULES = {"models/SCORER.py": "models.SCORER", "models/CBR.py": "models.CBR",
                     "models/transformer_decoder.py": "models.transformer_decoder",
                     "utils/utils.py": "utils.utils"}

# Tiny dimensions; the KEY VALUE pairs go on top of configs/defaults.py.
SMALL = {"model.change_detector.feat_dim": 10, "model.change_detector.att_dim": 16,
         "model.change_detector.att_head": 4, "model.change_detector.emb_dim": 20,
         "model.change_detector.grid": 8, "model.change_detector.mtm_chunk": 2,
         "model.change_detector.dropout": 0.0, "model.speaker.word_dim": 12,
         "model.speaker.att_dim": 16, "model.speaker.att_head": 4, "model.speaker.vocab_size": 11,
         "model.speaker.seq_length": 7, "model.speaker.dropout": 0.0, "model.cbr.att_dim": 16,
         "model.cbr.att_head": 4}


class Mismatch(Exception):
    """The student's snippet disagrees with the reference; the message says where and how."""


def small_cfg(**changes):
    """A frozen config with SMALL dimensions; changes use dotted keys as in SMALL."""
    from configs.defaults import load_config

    pairs = []
    for key, value in {**SMALL, **changes}.items():
        pairs += [key, str(value)]
    return load_config(None, pairs)


def load_student_module(path, rel):
    """Imports the student's file under a private name, so it never replaces the reference."""
    name = "student_" + rel.replace("/", "_").replace(".py", "")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def student_class(module, rel, name):
    cls = getattr(module, name, None)
    if cls is None:
        raise Mismatch(f"{rel} has no class {name}; keep the class names as handed out")
    return cls


def same_weights(student, reference):
    try:
        student.load_state_dict(reference.state_dict())
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise Mismatch(f"the module's parameters differ from the reference's ({first}); keep "
                       f"__init__ as handed out") from None


# ---------------------------------------------------------------- comparing tensors

def _location(index, axes):
    if not index:
        return ""
    if axes is None or len(axes) != len(index):
        return f" at index {tuple(index)}"
    parts = [f"{axis} {i}" for axis, i in zip(axes, index) if axis]
    return " at " + ", ".join(parts) if parts else ""


def compare(what, got, expected, case, axes=None, variants=(), fallback=None, strict_dtype=True):
    """Raises Mismatch naming the first differing element, the max abs difference and the case.

    variants: (tensor, hint) pairs of known mistakes, or a function returning them (called only
    on a mismatch); the hint of the first one the student's value equals is appended. Otherwise
    ``fallback`` (a hint about the case) is.
    """
    if not torch.is_tensor(got):
        raise Mismatch(f"{what} is a {type(got).__name__}, not a tensor, {case}")
    if tuple(got.shape) != tuple(expected.shape):
        raise Mismatch(f"{what} has shape {tuple(got.shape)} but the reference's is "
                       f"{tuple(expected.shape)} {case}")
    if got.dtype != expected.dtype:
        if strict_dtype or not got.is_floating_point():
            raise Mismatch(f"{what} has dtype {got.dtype} but the reference's is {expected.dtype} {case}")
        got = got.to(expected.dtype)
    got, expected = got.detach(), expected.detach()
    bad = ~torch.isclose(got, expected, rtol=RTOL, atol=ATOL)
    if not bad.any():
        return
    where = _location(bad.nonzero()[0].tolist(), axes)
    if not torch.isfinite(got).all():
        message = f"{what} holds NaN or inf{_location(torch.nonzero(~torch.isfinite(got))[0].tolist(), axes)} {case}"
    else:
        message = (f"{what} differs from the reference{where} (max abs diff "
                   f"{(got - expected).abs().max().item():.3g}) {case}")
    for candidate, hint in variants() if callable(variants) else variants:
        if candidate is not None and candidate.shape == got.shape and torch.allclose(
                got, candidate.detach().to(got.dtype), rtol=RTOL, atol=ATOL):
            return _fail(message, hint)
    _fail(message, fallback)


def _fail(message, hint):
    raise Mismatch(f"{message} — {hint}" if hint else message)


def _cotangent(tensor, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)


def _gradients(outputs, cotangents, wrt):
    live = [(o, c) for o, c in zip(outputs, cotangents) if torch.is_tensor(o) and o.requires_grad]
    if not live:
        return [None] * len(wrt)
    total = sum((o * c).sum() for o, c in live)
    return torch.autograd.grad(total, wrt, allow_unused=True)


def run_case(student, reference, inputs, call, outputs, case, variants=None, fallback=None):
    """Compares outputs, then the gradients w.r.t. inputs and parameters, for one case.

    inputs: {name: tensor} differentiable inputs; call(module, inputs) returns a tuple of
    outputs; outputs: one (label, axes) per output; variants(): [(outputs of a known mistake, hint)].
    """
    ref_in = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    stu_in = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    expected = call(reference, ref_in)
    got = call(student, stu_in)
    if not isinstance(got, tuple) or len(got) != len(expected):
        raise Mismatch(f"the forward returns {type(got).__name__} of the wrong length {case}; "
                       f"keep the return statement as handed out")
    for index, ((label, axes), g, e) in enumerate(zip(outputs, got, expected)):
        if e is not None:
            compare(label, g, e, case, axes,
                    lambda index=index: [(v[index], hint) for v, hint in (variants() if variants else ())],
                    fallback)

    cotangents = [_cotangent(e, 100 + i) if torch.is_tensor(e) else None for i, e in enumerate(expected)]
    ref_params = dict(reference.named_parameters())
    stu_params = dict(student.named_parameters())
    names = list(inputs) + list(ref_params)
    ref_grads = _gradients(expected, cotangents, list(ref_in.values()) + list(ref_params.values()))
    try:
        stu_grads = _gradients(got, cotangents, list(stu_in.values()) + [stu_params[n] for n in ref_params])
    except RuntimeError as error:
        raise Mismatch(f"backward fails {case}: {error}") from None
    for name, g, e in zip(names, stu_grads, ref_grads):
        if e is None:
            continue
        label = name if name in inputs else "parameter " + name
        if g is None:
            raise Mismatch(f"no gradient reaches {label} {case}; is the output detached from the inputs?")
        compare(f"the gradient w.r.t. {label}", g, e, case)


def attend(q, k, v, heads, mask=None, scale=True, transpose_back=True, softmax_dim=-1):
    """Multi-head attention with switches for the usual mistakes (hints only).

    q: (B, Lq, d), k/v: (B, Lk, d), mask: additive (B, 1, Lq, Lk) -> context (B, Lq, d), mean probs
    and mean scores (B, Lq, Lk).
    """
    B, Lq, d = q.shape
    dh = d // heads

    def split(t):
        return t.reshape(B, t.size(1), heads, dh).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2)
    if scale:
        scores = scores / math.sqrt(dh)
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=softmax_dim)
    context = probs @ split(v)
    context = context.transpose(1, 2).reshape(B, Lq, d) if transpose_back else context.reshape(B, Lq, d)
    return context, probs.mean(1), scores.mean(1)


ATTENTION_MISTAKES = (
    ({"scale": False}, "the scores are not divided by sqrt(dh)"),
    ({"transpose_back": False}, "the heads are merged in the wrong order: bring the head axis "
                                "next to dh (transpose(1, 2)) before reshaping to (B, L, d)"),
    ({"softmax_dim": -2}, "the softmax runs over the queries; it must run over the keys (last dim)"),
)


# ---------------------------------------------------------------- the six snippets

def _randn(*shape, scale=1.5):
    return torch.randn(*shape) * scale


def check_info_nce(student_module, rel, reference_module):
    student, reference = student_class(student_module, rel, "CrossEn")(), reference_module.CrossEn()

    def variants(sim):
        def over(dim):
            return -torch.diagonal(F.log_softmax(sim, dim=dim)).mean()
        rows = -torch.diagonal(F.log_softmax(sim, dim=-1))
        return [((over(0),), "the softmax runs over columns (dim 0); row k's positive is column k, "
                             "so normalise each row (dim -1)"),
                ((rows.sum(),), "this is the sum over k; the loss is the mean"),
                ((-rows.mean(),), "the sign is flipped: the loss is the mean of -log softmax")]

    torch.manual_seed(0)
    for B in (5, 1, 8, 3):
        sim = _randn(B, B, scale=3.0)
        run_case(student, reference, {"sim_matrix": sim}, lambda m, x: (m(x["sim_matrix"]),),
                 [("the loss", None)], f"for a {B}x{B} similarity matrix",
                 variants=lambda: variants(sim))
    return "value and gradient match for B = 1, 3, 5, 8"


def check_position_encoding(student_module, rel, reference_module):
    cls = student_class(student_module, rel, "PositionEncoding")

    def table(n, length, swap):
        position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
        angle = position / 10000.0 ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
        first, second = (torch.cos, torch.sin) if swap else (torch.sin, torch.cos)
        pe = torch.zeros(length, n, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = first(angle), second(angle[:, :n // 2])
        return pe.float()

    def half_exponent(n, length):
        angle = torch.arange(length, dtype=torch.float64).unsqueeze(1) / 10000.0 ** (
            torch.arange(n // 2, dtype=torch.float64) / n)
        pe = torch.zeros(length, n, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)
        return pe.float()

    torch.manual_seed(1)
    for n, length in ((16, 10), (300, 24), (2, 1), (12, 7)):
        case = f"for n_filters={n}, max_len={length}"
        student, reference = cls(n, length), reference_module.PositionEncoding(n, length)
        got = getattr(student, "pe", None)
        compare("the table pe", got, reference.pe, case, ("position", "column"),
                [(table(n, length, swap=True), "sin and cos are swapped: even columns take sin"),
                 (half_exponent(n, length), "the exponent uses i / n_filters; it is 2i / n_filters")],
                strict_dtype=False)
        offset = min(2, length - 1)
        x = _randn(2, length - offset, n)
        run_case(student, reference, {"x": x}, lambda m, i: (m(i["x"], offset),),
                 [("the forward output", ("batch", "position", None))],
                 f"{case} with offset {offset}")
    return "table and forward match for 4 sizes"


def _additive(allowed):
    """(B, Lq, Lk) 1/0 -> the additive (B, 1, Lq, Lk) mask the decoder builds for its blocks."""
    return ((1.0 - allowed) * -10000.0).unsqueeze(1)


def _mask_cases():
    """(description, B, Lq, Lk, additive mask) for SelfAttention; no row is fully masked."""
    causal = torch.tril(torch.ones(6, 6))
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0.0]])
    key_padding = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0.0]])
    return [
        ("with nothing masked", 2, 5, 5, _additive(torch.ones(2, 5, 5))),
        ("with nothing masked and batch 1, length 1", 1, 1, 1, _additive(torch.ones(1, 1, 1))),
        ("with a causal mask", 2, 6, 6, _additive(causal.expand(2, 6, 6))),
        ("with a causal and padding mask", 3, 6, 6, _additive(padding.unsqueeze(1) * causal)),
        ("with a padding mask and Lq=3 != Lk=7", 2, 3, 7, _additive(key_padding.unsqueeze(1).expand(2, 3, 7))),
        ("with a mask broadcast over the queries (one decoding step)", 2, 1, 7,
         _additive(key_padding.unsqueeze(1))),
    ]


def check_self_attention(student_module, rel, reference_module):
    cls = student_class(student_module, rel, "SelfAttention")
    torch.manual_seed(2)
    for dims in ({}, {"model.speaker.att_dim": 24, "model.speaker.att_head": 3}):
        cfg = small_cfg(**dims)
        d, heads = cfg.model.speaker.att_dim, cfg.model.speaker.att_head
        reference = reference_module.SelfAttention(cfg).eval()
        student = cls(cfg).eval()
        same_weights(student, reference)
        unmasked_passed = False
        for description, B, Lq, Lk, mask in _mask_cases():
            case = f"{description} (B={B}, d={d}, {heads} heads)"
            inputs = {"query_states": _randn(B, Lq, d)}
            if Lk != Lq:
                inputs["key_states"] = _randn(B, Lk, d)

            def call(module, x, mask=mask):
                keys = x.get("key_states", x["query_states"])
                return (module(x["query_states"], keys, keys, mask),)

            def variants(inputs=inputs, mask=mask):
                with torch.no_grad():
                    keys = inputs.get("key_states", inputs["query_states"])
                    q, k, v = reference.query(inputs["query_states"]), reference.key(keys), reference.value(keys)
                    found = [((attend(q, k, v, heads, mask, **switch)[0],), hint)
                             for switch, hint in ATTENTION_MISTAKES]
                    if (mask < 0).any():
                        found.insert(0, ((attend(q, k, v, heads)[0],), "the mask is not applied"))
                return found

            run_case(student, reference, inputs, call, [("the output", ("batch", "position", None))],
                     case, variants, "check the mask" if (mask < 0).any() and unmasked_passed else None)
            unmasked_passed = unmasked_passed or not (mask < 0).any()
    return "12 cases match: empty/causal/padding masks, Lq != Lk, one decoding step, batch 1"


def check_cross_attention(student_module, rel, reference_module):
    cls = student_class(student_module, rel, "CrossAttention")
    torch.manual_seed(3)
    for dims in ({}, {"model.speaker.att_dim": 24, "model.speaker.att_head": 3}):
        cfg = small_cfg(**dims)
        d, heads, e = cfg.model.speaker.att_dim, cfg.model.speaker.att_head, cfg.model.change_detector.emb_dim
        reference = reference_module.CrossAttention(cfg).eval()
        student = cls(cfg).eval()
        same_weights(student, reference)
        for B, L, grid in ((2, 5, (5, 7)), (1, 1, (3, 2)), (3, 4, (4, 4))):
            N = grid[0] * grid[1]
            case = f"for B={B}, L={L} and a {grid[0]}x{grid[1]} grid (N={N}), d={d}, {heads} heads"
            inputs = {"query_states": _randn(B, L, d), "grid_states": _randn(B, N, e)}

            def variants(inputs=inputs):
                with torch.no_grad():
                    grid_states = inputs["grid_states"]
                    q = reference.query(inputs["query_states"])
                    k, v = reference.key(grid_states), reference.value(grid_states)
                    return [((lambda r: (r[0], r[2]))(attend(q, k, v, heads, **switch)), hint)
                            for switch, hint in ATTENTION_MISTAKES]

            run_case(student, reference, inputs,
                     lambda m, x: tuple(m(x["query_states"], x["grid_states"], x["grid_states"])),
                     [("the context", ("batch", "position", None)),
                      ("the returned head-averaged scores", ("batch", "position", "grid token"))],
                     case, variants)
    return "6 cases match: batch 1, L != N, non-square grids"


def check_scorer_attention(student_module, rel, reference_module):
    cls = student_class(student_module, rel, "Attention")
    torch.manual_seed(4)
    for dims in ({}, {"model.change_detector.att_dim": 24, "model.change_detector.att_head": 3,
                      "model.cbr.att_dim": 24, "model.cbr.att_head": 3}):
        cfg = small_cfg(**dims)
        d, heads = cfg.model.change_detector.att_dim, cfg.model.change_detector.att_head
        reference = reference_module.Attention(cfg).eval()
        student = cls(cfg).eval()
        same_weights(student, reference)
        for B, grid, similarity in ((2, (5, 7), False), (1, (3, 2), False), (3, (4, 4), True)):
            N = grid[0] * grid[1]
            case = f"for B={B} and a {grid[0]}x{grid[1]} grid (N={N}), d={d}, {heads} heads"
            inputs = {"query_states": _randn(B, N, d), "key_states": _randn(B, N, d)}

            def call(module, x, similarity=similarity):
                return tuple(module(x["query_states"], x["key_states"], x["key_states"], similarity))

            def variants(inputs=inputs):
                with torch.no_grad():
                    q = reference.query(inputs["query_states"])
                    k, v = reference.key(inputs["key_states"]), reference.value(inputs["key_states"])
                    found = []
                    for switch, hint in ATTENTION_MISTAKES:
                        context, probs, _ = attend(q, k, v, heads, **switch)
                        found.append(((reference.layer_norm(context + inputs["query_states"]), None, probs), hint))
                    return found

            run_case(student, reference, inputs, call,
                     [("the output", ("batch", "token", None)), ("the similarity S", ("row", "column")),
                      ("the attention map", ("batch", "query token", "key token"))],
                     case, variants)
    return "6 cases match: batch 1, non-square grids"


SNIPPET_CHECKS = {
    "CBR.CrossEn": check_info_nce,
    "utils.CrossEn": check_info_nce,
    "PositionEncoding": check_position_encoding,
    "SelfAttention": check_self_attention,
    "CrossAttention": check_cross_attention,
    "Attention": check_scorer_attention,
}


# ---------------------------------------------------------------- the smoke run

SMOKE_STEPS = 30


def smoke_batch(generator, B=4, L=7, vocab=11, grid=(3, 4), channels=8):
    """A fixed random batch: features (B, C, H, W) and one caption per pair."""
    def captions():
        lengths = torch.randint(3, L, (B,), generator=generator)  # index of <END>
        labels = torch.randint(4, vocab, (B, 1, L), generator=generator)
        positions = torch.arange(L).view(1, 1, L)
        end = lengths.view(B, 1, 1)
        labels[:, :, 0] = 2  # <START>
        labels = torch.where(positions == end, torch.full_like(labels, 3), labels)  # <END>
        labels = labels.masked_fill(positions > end, 0)  # <NULL>
        return labels, (positions <= end).float()

    feats = {k: torch.randn(B, channels, *grid, generator=generator) for k in ("d_feat", "q_feat", "n_feat")}
    pos_labels, pos_masks = captions()
    neg_labels, neg_masks = captions()
    return {**feats, "pos_labels": pos_labels, "pos_masks": pos_masks,
            "neg_labels": neg_labels, "neg_masks": neg_masks}


def smoke_run():
    """Trains the model of the project in the current folder (a fresh interpreter started there by
    grading.runner, so models/ and utils/ are the submission's); the total loss must drop by a fifth."""
    from models.captioner import CaptionModel

    torch.manual_seed(5)
    cfg = small_cfg()
    model = CaptionModel(cfg)
    batch = smoke_batch(torch.Generator().manual_seed(6))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    history = []
    for step in range(SMOKE_STEPS):
        losses = model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
        total = losses["total"]
        if not torch.isfinite(total):
            bad = [name for name, value in losses.items() if not torch.isfinite(value)]
            raise Mismatch(f"the loss is not finite at step {step} ({', '.join(bad)})")
        history.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    first, last = history[0], sum(history[-3:]) / 3
    if not last < first * 0.8:
        raise Mismatch(f"the loss does not decrease enough: {first:.3f} at step 0, {last:.3f} over the "
                       f"last 3 of {SMOKE_STEPS} steps (needs < {first * 0.8:.3f})")
    model.eval()
    seq, _ = model.generate(batch["d_feat"], batch["q_feat"])
    if tuple(seq.shape) != (4, cfg.model.speaker.seq_length):
        raise Mismatch(f"greedy decoding returns shape {tuple(seq.shape)}, expected (4, {cfg.model.speaker.seq_length})")
    return f"loss {first:.3f} -> {last:.3f} in {SMOKE_STEPS} steps; decoding works"
