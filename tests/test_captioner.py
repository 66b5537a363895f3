"""models/captioner.py: the whole model's losses and gradients, its state-dict keys and initial weights,
recomputation in backward, the subtraction encoder, label smoothing."""
import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from configs.defaults import load_config
from models.captioner import CaptionModel
from tests.helpers import small_cfg
from utils.utils import LabelSmoothingLoss

pytestmark = pytest.mark.snippets  # every test here builds the whole model

REFERENCE_KEYS = os.path.join(os.path.dirname(__file__), "reference_state_dict.txt")


def random_batch(B=2, L=7, grid=(5, 7), channels=8, seed=7):
    generator = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(B, channels, *grid, generator=generator) for k in ("d_feat", "q_feat", "n_feat")}
    labels = torch.tensor([[[2, 5, 6, 7, 3, 0, 0]], [[2, 8, 3, 0, 0, 0, 0]]])[:B]
    masks = (torch.arange(L) <= torch.tensor([4, 2])[:B].view(B, 1, 1)).float()
    return {**feats, "pos_labels": labels, "pos_masks": masks, "neg_labels": labels.flip(0),
            "neg_masks": masks.flip(0)}


def test_losses_gradients_and_generation_on_a_5x7_grid():
    torch.manual_seed(7)
    cfg = small_cfg()
    model = CaptionModel(cfg)
    losses = model(random_batch(), lambda_v=0.1, lambda_m=0.001)
    assert set(losses) == {"total", "caption", "cross_view", "cross_modal"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    for name, parameter in model.named_parameters():
        if name == "change_detector.scorer.0.attention.logit_scale":
            assert parameter.grad is None  # only the last block's similarity enters the loss
        else:
            assert parameter.grad is not None, name
    assert model.cbr.conv1.weight.grad.abs().sum() > 0  # the CBR head trains (the reference's bug is fixed)

    model.eval()
    seq, logprobs, _, _ = model.generate(random_batch()["d_feat"], random_batch()["q_feat"])
    assert seq.shape == (2, cfg.model.speaker.seq_length) and logprobs.shape == seq.shape


def test_state_dicts_have_the_reference_keys_shapes_and_order():
    cfg = load_config("configs/dynamic/transformer.yaml")
    model = CaptionModel(cfg)
    ours = [f"{prefix}.{key} {tuple(value.shape)}"
            for prefix, module in (("change_detector_state", model.change_detector), ("speaker_state", model.speaker),
                                   ("cbr_state", model.cbr))
            for key, value in module.state_dict().items()]
    with open(REFERENCE_KEYS) as handle:
        reference = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    # The state dict lists modules in the order they were registered, and a module draws its
    # initial weights from the generator when it is built: the same order means the same initial
    # weights under the same seed as the reference code (the decoder's fc before its embedding).
    assert ours == reference


def test_same_seed_same_initial_weights():
    cfg = small_cfg()
    torch.manual_seed(1111)
    first = CaptionModel(cfg).state_dict()
    torch.manual_seed(1111)
    second = CaptionModel(cfg).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_recomputed_attention_gives_the_same_losses_and_gradients_with_dropout():
    cfg = small_cfg()
    results = []
    for recompute in (True, False):
        torch.manual_seed(0)
        model = CaptionModel(cfg, recompute=recompute)
        torch.manual_seed(1)
        losses = model(random_batch(B=2, grid=(3, 4)), cfg.train.lambda_v, cfg.train.lambda_m)
        losses["total"].backward()
        results.append((losses["total"].item(), {k: p.grad.clone() for k, p in model.named_parameters()
                                                 if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-7) for k in grads_a)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def test_recompute_keeps_the_products_and_rebuilds_the_attention():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = CaptionModel(cfg, recompute=True)
    with OpCounter() as forward:
        losses = model(random_batch(B=2, grid=(3, 4)), cfg.train.lambda_v, cfg.train.lambda_m)
    with OpCounter() as backward:
        losses["total"].backward()
    similarity, softmax = torch.ops.scorer.mean_max_similarity.default, torch.ops.aten._softmax.default
    assert forward.calls[similarity] == 6  # the last encoder block's two and the CBR head's, for both pairs
    assert backward.calls[similarity] == 0 and backward.calls[torch.ops.aten.convolution.default] == 0
    assert backward.calls[torch.ops.aten.addmm.default] == 0  # the linear maps' outputs are kept
    assert backward.calls[softmax] == forward.calls[softmax] > 0  # every attention is rebuilt


def test_recompute_keeps_the_state_dict_and_the_students_modules():
    model = CaptionModel(small_cfg(), recompute=True)
    plain = CaptionModel(small_cfg())
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all("forward" not in vars(module) for module in model.modules())  # no method replaced at run time


def test_subtraction_encoder_has_no_blocks_and_no_cross_view_loss():
    torch.manual_seed(3)
    model = CaptionModel(small_cfg("model.change_detector.encoder", "subtraction"))
    assert not any(key.startswith("scorer.") for key in model.change_detector.state_dict())
    losses = model(random_batch(), lambda_v=0.1, lambda_m=0.001)
    assert losses["cross_view"].item() == 0.0
    losses["total"].backward()
    assert model.change_detector.embed_fc[0].weight.grad.abs().sum() > 0
    encoded = model.change_detector(torch.randn(2, 10, 3, 4), torch.randn(2, 10, 3, 4))
    assert encoded.out.shape == (2, 12, 16) and encoded.sim_ba is None
    model.eval()
    generated = model.generate(random_batch()["d_feat"], random_batch()["q_feat"])
    assert generated.encoder_attention == (None, None) and generated.tokens.shape == (2, 7)


def test_label_smoothing_uses_the_reference_definition():
    torch.manual_seed(4)
    model = CaptionModel(small_cfg("model.speaker.label_smoothing", "0.1"))
    logits, target = torch.randn(2, 7, 11), torch.tensor([[5, 6, 3, -1, -1, -1, -1]] * 2)
    expected = LabelSmoothingLoss(0.1, 11)(logits.view(-1, 11), target.view(-1))
    assert model.caption_loss(logits, target).item() == pytest.approx(expected.item())
    plain = CaptionModel(small_cfg())
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=-1)
    assert plain.caption_loss(logits, target).item() == pytest.approx(ce.item())
