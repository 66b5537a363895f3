"""The fast paths give the straightforward formulation's results (scripts/benchmark.py compares the two).

Cached decoding against recomputing the prefix is tested in
tests/test_models.py::test_cached_decoding_equals_recomputing_the_prefix (greedy and beam search).
"""
import copy
import json

import pytest
import torch

import benchmark
from tests.model_helpers import small_cfg
from utils.engine import CaptionModel
from utils.utils import Dropout

SMALL = ["--batch_size", "4", "--grid", "3", "--steps", "1", "--cfg", "configs/dynamic/transformer_quick.yaml",
         "model.change_detector.feat_dim", "10", "model.change_detector.att_dim", "16",
         "model.change_detector.emb_dim", "16", "model.speaker.att_dim", "16", "model.speaker.word_dim", "12",
         "model.cbr.att_dim", "16", "model.speaker.seq_length", "7", "model.speaker.vocab_size", "11"]


def model_and_batch(*overrides):
    cfg = small_cfg(*overrides)
    torch.manual_seed(0)
    model = CaptionModel(cfg)
    batch = benchmark.random_batch(cfg, batch_size=4, grid=3, device=torch.device("cpu"))
    return cfg, model, batch


@pytest.mark.snippets
@pytest.mark.parametrize("beam_size", [1, 2])
def test_fast_model_step_and_generation_equal_the_straightforward_ones(beam_size):
    # Dropout stays on: both formulations draw the same masks.
    cfg, model, batch = model_and_batch()
    check = benchmark.compare(model, copy.deepcopy(model.state_dict()), batch, cfg, torch.device("cpu"), beam_size)
    assert check["losses_equal"] and check["tokens_equal"]
    assert check["grads_allclose"], check["max_grad_diff"]


def test_cpu_dropout_drops_p_and_keeps_the_expectation():
    layer = Dropout(0.1).train()
    x = torch.rand(1000, 1000) + 0.5
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 6554 / 65536) < 0.002  # p rounded to 1/65536; 0.002 is about 7 standard deviations
    scale = 65536 / (65536 - 6554)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=1e-6, atol=0)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.003  # unbiased
    assert torch.equal(layer.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


def test_cpu_dropout_gradient_and_seeding():
    layer = Dropout(0.3).train()
    x = torch.randn(64, 50, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).float() * (65536 / (65536 - round(0.3 * 65536))))
    torch.manual_seed(5)
    assert torch.equal(layer(x), y)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.snippets
def test_straightforward_switches_the_fast_paths_off_and_back_on():
    cfg, model, batch = model_and_batch()
    attention = model.change_detector.scorer[0].attention
    calls = []
    with benchmark.straightforward(model, 4):
        assert not attention.sparse_backward and attention.mtm_chunk == 4 and not attention.recompute
        assert not model.cbr.recompute and not model.cbr.contra.sparse_backward
        assert not any(layer.recompute for layer in model.speaker.core.layer)
        _, sim, _ = attention(*(torch.randn(2, 9, 16),) * 3, compute_similarity=False)
        calls.append(sim)
    assert calls[0] is not None  # the MTM runs at every block, asked or not
    assert attention.sparse_backward and attention.mtm_chunk == 2 and attention.recompute
    assert all(layer.recompute for layer in model.speaker.core.layer)
    assert "forward" not in attention.__dict__ and "sample" not in model.speaker.__dict__


@pytest.mark.snippets
def test_recomputed_attention_gives_the_same_gradients_with_dropout():
    results = []
    for recompute in (True, False):
        cfg, model, batch = model_and_batch("train.recompute_attention", str(recompute))
        torch.manual_seed(1)
        losses = model(batch, cfg.train.lambda_v, cfg.train.lambda_m)
        losses["total"].backward()
        results.append((losses["total"].item(), {k: p.grad.clone() for k, p in model.named_parameters()
                                                 if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-7) for k in grads_a)


@pytest.mark.snippets
def test_benchmark_cli_prints_both_variants_and_their_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main([*SMALL[:8], "--skip_memory", "--json", str(out), *SMALL[8:]])
    printed = capsys.readouterr().out
    assert "straightforward" in printed and "faster" in printed and "outputs agree" in printed
    report = json.loads(out.read_text())
    assert report["check"] == {**report["check"], "losses_equal": True, "grads_allclose": True, "tokens_equal": True}
    for variant in ("fast", "straightforward"):
        assert report["results"][variant]["train_step_s"] > 0
        assert report["results"][variant]["generate_pairs_per_s"] > 0
    assert set(report["ratios"]) == {"train_speedup", "generate_speedup"}


@pytest.mark.snippets
def test_memory_probe_runs_in_a_fresh_process():
    args = benchmark.parse_args(SMALL)
    peak = benchmark.measure_memory(args, "straightforward", "train")
    assert 0 <= peak < 2 ** 30  # a tiny model's step


def test_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--batch_size", "0"])
    assert exit_info.value.code == 2
    assert "--batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--cfg", "configs/none.yaml"])
    assert exit_info.value.code == 2
    assert "configs/none.yaml does not exist" in capsys.readouterr().err
