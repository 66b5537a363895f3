"""Recorded inputs and outputs of the six snippets, the student handout's way of checking them.

When the handout is cut (scripts/make_handout.py), record() runs the solution on seeded random
inputs of several sizes and stores inputs, weights, outputs and the gradients for fixed output
cotangents in tests/snippet_cases.pt. tests/test_snippets.py runs the snippets of the files at
hand on the same inputs and compares. In the full project, where the file is absent, load()
records the cases in memory.
"""
import os
import sys

import torch

from configs.defaults import load_config

CASES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snippet_cases.pt")
SMALL = ["model.change_detector.feat_dim", "10", "model.change_detector.att_dim", "16",
         "model.change_detector.att_head", "4", "model.change_detector.emb_dim", "20",
         "model.change_detector.grid", "8", "model.change_detector.dropout", "0.0",
         "model.speaker.word_dim", "12", "model.speaker.att_dim", "16", "model.speaker.att_head", "4",
         "model.speaker.vocab_size", "11", "model.speaker.seq_length", "7", "model.speaker.dropout", "0.0",
         "model.cbr.att_dim", "16", "model.cbr.att_head", "4"]
WIDER = {"Attention": ["model.change_detector.att_dim", "24", "model.change_detector.att_head", "3",
                       "model.cbr.att_dim", "24", "model.cbr.att_head", "3"],
         "SelfAttention": ["model.speaker.att_dim", "24", "model.speaker.att_head", "3"],
         "CrossAttention": ["model.speaker.att_dim", "24", "model.speaker.att_head", "3"]}


def build_module(name, case):
    """The module of snippet ``name`` made from the files of this checkout, with the case's weights."""
    if name == "CBR.CrossEn":
        from models.CBR import CrossEn
        return CrossEn()
    if name == "utils.CrossEn":
        from utils.utils import CrossEn
        return CrossEn()
    if name == "PositionEncoding":
        from models.transformer_decoder import PositionEncoding
        return PositionEncoding(*case["shape"])
    from models.SCORER import Attention
    from models.transformer_decoder import CrossAttention, SelfAttention
    module = {"Attention": Attention, "SelfAttention": SelfAttention, "CrossAttention": CrossAttention}[name](
        load_config(None, case["config"]))
    if "weights" in case:
        module.load_state_dict(case["weights"])
    return module.eval()  # no dropout: the outputs are exact


def run(name, module, inputs, case):
    """The snippet's outputs (a tuple) for the case's inputs."""
    if name.endswith("CrossEn"):
        return (module(inputs["sim_matrix"]),)
    if name == "PositionEncoding":
        return (module.pe, module(inputs["x"], case["offset"]))
    if name == "SelfAttention":
        keys = inputs.get("key_states", inputs["query_states"])
        return (module(inputs["query_states"], keys, keys, case["mask"]),)
    if name == "CrossAttention":
        return tuple(module(inputs["query_states"], inputs["grid_states"], inputs["grid_states"]))
    output, _, attention_map = module(inputs["query_states"], inputs["key_states"], inputs["key_states"], False)
    return output, attention_map


def _additive(allowed):
    """(B, Lq, Lk) of 1 (may look) / 0 -> the additive (B, 1, Lq, Lk) mask the decoder gives the block."""
    return ((1.0 - allowed) * -10000.0).unsqueeze(1)


def _specs(generator):
    """[(snippet, case without outputs)] with seeded inputs."""
    def randn(*shape, scale=1.5):
        return torch.randn(*shape, generator=generator) * scale

    specs = []
    for name in ("CBR.CrossEn", "utils.CrossEn"):
        for B in (5, 1, 8, 3):
            specs.append((name, {"what": f"a {B}x{B} similarity matrix", "inputs": {"sim_matrix": randn(B, B, scale=3.0)}}))
    for n, length in ((16, 10), (300, 24), (2, 1), (12, 7)):
        offset = min(2, length - 1)
        specs.append(("PositionEncoding", {"what": f"n_filters={n}, max_len={length}, offset {offset}",
                                           "shape": (n, length), "offset": offset,
                                           "inputs": {"x": randn(2, length - offset, n)}}))
    causal = torch.tril(torch.ones(6, 6))
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0.0]])
    keys = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0.0]])
    masks = [("nothing masked", 2, 5, 5, torch.ones(2, 5, 5)), ("a causal mask", 2, 6, 6, causal.expand(2, 6, 6)),
             ("a causal and padding mask", 3, 6, 6, padding.unsqueeze(1) * causal),
             ("padded keys, Lq=3 != Lk=7", 2, 3, 7, keys.unsqueeze(1).expand(2, 3, 7)),
             ("one decoding step, Lq=1, Lk=7", 2, 1, 7, keys.unsqueeze(1))]
    for extra in ([], WIDER["SelfAttention"]):
        d = int(dict(zip(extra[::2], extra[1::2])).get("model.speaker.att_dim", 16))
        for what, B, Lq, Lk, allowed in masks:
            inputs = {"query_states": randn(B, Lq, d)}
            if Lq != Lk:
                inputs["key_states"] = randn(B, Lk, d)
            specs.append(("SelfAttention", {"what": f"{what} (B={B}, d={d})", "config": SMALL + extra,
                                            "mask": _additive(allowed), "inputs": inputs}))
    for extra in ([], WIDER["CrossAttention"]):
        d = int(dict(zip(extra[::2], extra[1::2])).get("model.speaker.att_dim", 16))
        for B, L, (H, W) in ((2, 5, (5, 7)), (1, 1, (3, 2)), (3, 4, (4, 4))):
            specs.append(("CrossAttention", {"what": f"B={B}, L={L}, a {H}x{W} grid, d={d}", "config": SMALL + extra,
                                             "inputs": {"query_states": randn(B, L, d), "grid_states": randn(B, H * W, 20)}}))
    for extra in ([], WIDER["Attention"]):
        d = int(dict(zip(extra[::2], extra[1::2])).get("model.change_detector.att_dim", 16))
        for B, (H, W) in ((2, (5, 7)), (1, (3, 2)), (3, (4, 4))):
            specs.append(("Attention", {"what": f"B={B}, a {H}x{W} grid, d={d}", "config": SMALL + extra,
                                        "inputs": {"query_states": randn(B, H * W, d), "key_states": randn(B, H * W, d)}}))
    return specs


def outputs_and_gradients(name, module, case):
    """(outputs, {input or parameter: gradient}) for the case's inputs and output cotangents."""
    inputs = {k: v.clone().requires_grad_() for k, v in case["inputs"].items()}
    outputs = run(name, module, inputs, case)
    live = [(o, c) for o, c in zip(outputs, case["cotangents"]) if o.requires_grad]
    wrt = dict(inputs, **{f"parameter {k}": p for k, p in module.named_parameters()})
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in live), list(wrt.values()),
                                allow_unused=True) if live else [None] * len(wrt)
    return outputs, dict(zip(wrt, grads))


def record(path=None):
    """{snippet: [case]} from the solution in this checkout; saved to ``path`` when given."""
    generator = torch.Generator().manual_seed(2024)
    cases = {}
    for name, case in _specs(generator):
        torch.manual_seed(len(cases.get(name, [])) + 17)
        module = build_module(name, case)
        if list(module.parameters()):
            case["weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        probe = run(name, module, case["inputs"], case)
        case["cotangents"] = [torch.randn(o.shape, generator=generator) for o in probe]
        outputs, grads = outputs_and_gradients(name, module, case)
        case["outputs"] = [o.detach() for o in outputs]
        case["gradients"] = {k: g for k, g in grads.items() if g is not None}
        cases.setdefault(name, []).append(case)
    if path is not None:
        torch.save(cases, path)
    return cases


def main(argv):
    """python -m tests.snippet_cases --record PATH (run by scripts/make_handout.py in the full project)."""
    if len(argv) != 2 or argv[0] != "--record":
        sys.exit("usage: python -m tests.snippet_cases --record PATH")
    record(argv[1])


def load():
    """The recorded cases: tests/snippet_cases.pt in the handout, recorded now in the full project."""
    if os.path.exists(CASES_FILE):
        return torch.load(CASES_FILE, weights_only=True)
    return record()


if __name__ == "__main__":
    main(sys.argv[1:])
