"""Records the snippet cases from the solution: the public ones the handout checks with (`make snippets`)
and the hidden ones the grader scores with, of other sizes and seeds; the hidden set also holds the
smoke run's case (SMOKE): initial weights, a batch, and the solution's losses at every step and
greedy captions after training.

    python -m grading.recorder public PATH      # run by grading/make_handout.py
    python -m grading.recorder hidden PATH      # run by python -m grading.autograder build

Each case gets the solution's outputs, gradients and dropout shapes, and the outputs of every known
mistake (grading.mistakes) that differ from them, with the mistake's hint (tests/snippet_cases.py
explains the format). Runs in the full project only: it needs the solution.
"""
import os
import sys
import types

import torch

from configs.defaults import load_config
from grading import REPO, GradingError, snippet_cases_module
from grading import child
from grading import mistakes as known
from grading.child import SMALL, SMOKE, SMOKE_STEPS
from grading.grader import judge_smoke
from grading.snippets import assignment_blocks, read_text
from models.captioner import CaptionModel

snippet_cases = snippet_cases_module()

TRAINING_DROPOUT = "0.25"

# The sizes of each set. Masks: (what, B, Lq, Lk, real keys per row or None, causal).
SETS = {
    "public": {
        "seed": 2024, "info_nce": (5, 1, 8, 3), "tables": ((16, 10), (300, 24), (2, 1), (12, 7)),
        "heads": ((16, 4), (24, 3)),
        "masks": (("no mask", 2, 5, 5, None, False), ("a causal mask", 2, 6, 6, None, True),
                  ("a causal and padding mask", 3, 6, 6, (6, 4, 2), True),
                  ("padded keys, Lq=3 != Lk=7", 2, 3, 7, (7, 3), False),
                  ("one decoding step, Lq=1, Lk=7", 2, 1, 7, (7, 3), True)),
        "cross": ((2, 5, (5, 7)), (1, 1, (3, 2)), (3, 4, (4, 4))),
        "grids": ((2, (5, 7)), (1, (3, 2)), (3, (4, 4))),
    },
    "hidden": {
        "seed": 8191, "info_nce": (2, 7, 1, 11), "tables": ((20, 9), (7, 5), (512, 24), (4, 1)),
        "heads": ((16, 2), (30, 5)),
        "masks": (("no mask", 3, 4, 4, None, False), ("batch 1, length 1", 1, 1, 1, None, True),
                  ("a causal mask", 2, 7, 7, None, True), ("a causal and padding mask", 3, 5, 5, (5, 3, 1), True),
                  ("padded keys, Lq=2 != Lk=6", 2, 2, 6, (6, 2), False),
                  ("one decoding step, Lq=1, Lk=5", 3, 1, 5, (5, 4, 1), True)),
        "cross": ((1, 1, (2, 3)), (2, 6, (3, 5)), (4, 3, (1, 7))),
        "grids": ((1, (2, 3)), (2, (4, 6)), (3, (5, 5))),
        "smoke": 31,  # seed of the smoke run's initial weights (and, plus one, of its batch)
    },
}
DIRECTION_NOTE = {
    "CBR.CrossEn": "The block computes one direction, each row of sim_matrix against its own column; "
                   "CBR.forward (models/CBR.py) averages it over S and S^T",
    "utils.CrossEn": "The block computes one direction, each row of sim_matrix against its own column; "
                     "CaptionModel.pair_losses (models/captioner.py) averages it over S and S^T",
}
MASK_NOTE = ("The cases without a mask match, so look at how attention_mask enters: it is added to the "
             "scaled scores before the softmax")
TRAINING_NOTE = "The evaluation-mode cases match, so look at where self.dropout is applied"


def _additive(B, Lq, Lk, lengths, causal):
    """The (B, 1, Lq, Lk) additive mask the decoder gives the block; the Lq queries are the last Lq positions."""
    allowed = torch.ones(B, Lq, Lk)
    if lengths is not None:
        allowed = allowed * (torch.arange(Lk) < torch.tensor(lengths).view(B, 1)).float().unsqueeze(1)
    if causal:
        allowed = allowed * torch.ones(Lq, Lk).tril(Lk - Lq)
    return ((1.0 - allowed) * -10000.0).unsqueeze(1)


def _head_config(extra_keys, d, heads, train):
    dropout = TRAINING_DROPOUT if train else "0.0"
    pairs = []
    for key in extra_keys:
        pairs += [f"{key}.att_dim", str(d), f"{key}.att_head", str(heads)]
    dropout_key = "model.change_detector.dropout" if "model.change_detector" in extra_keys else "model.speaker.dropout"
    return SMALL + pairs + [dropout_key, dropout]


def _specs(kind):
    """[(snippet, case without answers)] of one set, inputs drawn from the set's seed."""
    sizes = SETS[kind]
    generator = torch.Generator().manual_seed(sizes["seed"])

    def randn(*shape, scale=1.5):
        return torch.randn(*shape, generator=generator) * scale

    specs = []
    for name in known.INFO_NCE:
        for B in sizes["info_nce"]:
            specs.append((name, {"what": f"a {B}x{B} similarity matrix", "hint": DIRECTION_NOTE[name],
                                 "inputs": {"sim_matrix": randn(B, B, scale=3.0)}}))
    for n, length in sizes["tables"]:
        offset = min(2, length - 1)
        specs.append(("PositionEncoding", {"what": f"n_filters={n}, max_len={length} (forward at offset {offset})",
                                           "shape": (n, length), "offset": offset,
                                           "inputs": {"x": randn(2, length - offset, n)}}))
    for train in (False, True):
        for d, heads in sizes["heads"]:
            mode = ", in training mode" if train else ""
            masks = sizes["masks"] if not train else [m for m in sizes["masks"] if m[0].startswith("a causal and")]
            for what, B, Lq, Lk, lengths, causal in masks:
                inputs = {"query_states": randn(B, Lq, d)}
                if Lq != Lk:
                    inputs["key_states"] = randn(B, Lk, d)
                masked = lengths is not None or causal
                specs.append(("SelfAttention", {
                    "what": f"{what} (B={B}, d={d}, {heads} heads){mode}", "train": train,
                    "config": _head_config(["model.speaker"], d, heads, train),
                    "mask": _additive(B, Lq, Lk, lengths, causal), "inputs": inputs,
                    "fallback": TRAINING_NOTE if train else MASK_NOTE if masked else None}))
            for B, L, (H, W) in sizes["cross"][:1 if train else None]:
                specs.append(("CrossAttention", {
                    "what": f"B={B}, L={L}, a {H}x{W} grid (N={H * W}), d={d}, {heads} heads{mode}", "train": train,
                    "config": _head_config(["model.speaker"], d, heads, train),
                    "inputs": {"query_states": randn(B, L, d), "grid_states": randn(B, H * W, 20)},
                    "fallback": TRAINING_NOTE if train else None}))
            for B, (H, W) in sizes["grids"][:1 if train else None]:
                specs.append(("Attention", {
                    "what": f"B={B}, a {H}x{W} grid (N={H * W}), d={d}, {heads} heads{mode}", "train": train,
                    "config": _head_config(["model.change_detector", "model.cbr"], d, heads, train),
                    "inputs": {"query_states": randn(B, H * W, d), "key_states": randn(B, H * W, d)},
                    "fallback": TRAINING_NOTE if train else None}))
    order = list(snippet_cases.OUTPUTS)
    return sorted(specs, key=lambda spec: order.index(spec[0]))  # stable: each snippet's cases keep their order


def _mistaken_classes(name, rel, text):
    """[(mistake, class of the snippet with that mistake made)] from the solution file's text."""
    found = []
    for mistake in known.for_snippet(name):
        module = types.ModuleType(f"mistake_{mistake.name}")
        module.__file__ = os.path.join(REPO, rel)
        exec(compile(known.apply(mistake, name, text, rel), f"<{rel} with {mistake.name}>", "exec"), module.__dict__)
        found.append((mistake, getattr(module, name.split(".")[-1])))
    return found


def _differs(got, expected):
    return not (torch.is_tensor(got) and got.shape == expected.shape
                and torch.allclose(got, expected, rtol=snippet_cases.RTOL, atol=snippet_cases.ATOL))


def smoke_case(seed):
    """The smoke case: the solution's initial weights of ``seed``, a fixed batch, and the solution's
    smoke run from them (grading.child.smoke_train). GradingError when that run does not learn, or
    when it is so sensitive to rounding that a correct submission could miss it: rerun in float64, it
    must stay within a tenth of the grader's tolerances."""
    torch.manual_seed(seed)
    model = CaptionModel(load_config(None, SMALL))
    case = {"weights": {name: p.detach().clone() for name, p in model.named_parameters()},
            "batch": child.smoke_batch(torch.Generator().manual_seed(seed + 1))}
    result = child.smoke_run(case)
    if "error" in result:
        raise GradingError(f"the solution's smoke run fails: {result['error']}")
    case.update(result)
    total = result["losses"]["total"]
    if len(total) != SMOKE_STEPS or not total[-1] < 0.8 * total[0]:
        raise GradingError(f"the solution's loss does not fall by a fifth in the smoke run ({total[0]:.3f} -> "
                           f"{total[-1]:.3f}); choose another seed in grading/recorder.py: SETS")
    model, cfg = child.smoke_model(case["weights"])
    batch = {key: value.double() if value.is_floating_point() else value for key, value in case["batch"].items()}
    stable, message = judge_smoke(case, child.smoke_train(model.double(), cfg, batch), scale=0.1)
    if not stable:
        first = message.split(". ")[0]
        raise GradingError(f"the solution's smoke run (seed {seed}) is too sensitive to rounding to grade with: "
                           f"in float64, {first[:1].lower()}{first[1:]}; choose another seed in "
                           f"grading/recorder.py: SETS")
    return case


def record(kind, path=None):
    """{snippet: [case]} of set ``kind`` ("public" or "hidden"), from the solution in this checkout, and
    for the hidden set {SMOKE: the smoke case}."""
    files = {}
    for rel, blocks in assignment_blocks(REPO).items():
        text = read_text(os.path.join(REPO, rel))
        for block in blocks:
            if any("raise NotImplementedError" in line for line in text.splitlines()[block.code_start:block.end]):
                raise GradingError(f"{rel}: the {block.name} block holds no solution; record the cases "
                                   f"in the full project, not in the handout")
            files[block.name] = (rel, text)
    cases, variants = {}, {}
    for name, case in _specs(kind):
        if name not in variants:
            variants[name] = _mistaken_classes(name, *files[name])
        case["seed"] = len(cases.get(name, [])) + 5  # the fixed dropout masks of a training case
        if "config" in case:
            torch.manual_seed(len(cases.get(name, [])) + 17)  # the module's initial weights
            fresh = snippet_cases.snippet_class(name)(load_config(None, case["config"]))
            case["weights"] = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
        module = snippet_cases.build_module(name, case)
        probe = snippet_cases.run(name, module, case["inputs"], case)
        case["cotangents"] = [torch.randn(o.shape, generator=torch.Generator().manual_seed(case["seed"])) for o in probe]
        result = snippet_cases.compute(name, case)
        case["outputs"], case["gradients"], case["dropout"] = result["outputs"], result["gradients"], result["dropout"]
        case["mistakes"] = []
        for mistake, cls in variants[name]:
            if mistake.training_only and not case.get("train"):
                continue
            try:
                outputs = snippet_cases.compute(name, case, cls, gradients=False)["outputs"]
            except Exception:  # this mistake breaks the case outright: its error message will say so
                continue
            kept = [o if _differs(o, e) else None for o, e in zip(outputs, case["outputs"])]
            if any(o is not None for o in kept):
                case["mistakes"].append({"hint": mistake.hint, "outputs": kept})
        cases.setdefault(name, []).append({k: v for k, v in case.items() if v is not None})
    if "smoke" in SETS[kind]:
        cases[SMOKE] = smoke_case(SETS[kind]["smoke"])
    if path is not None:
        torch.save(cases, path)
    return cases


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in SETS:
        sys.exit("usage: python -m grading.recorder public|hidden PATH")
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        record(argv[0], argv[1])
    except GradingError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
