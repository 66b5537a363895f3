"""research/probe_encoder.py: the figures docs/ablation.md explains the reconstruction collapse with."""
import math

import pytest
import torch

from models.captioner import CaptionModel
from research import probe_encoder
from tests.helpers import small_cfg, write_cfg

pytestmark = pytest.mark.snippets


def _features(seed, B=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 8, 3, 4, generator=generator) for _ in range(3)]  # feat_dim 10: 8 + 2 coordinates


def test_probe_against_a_per_scene_formula_and_a_dead_relu():
    torch.manual_seed(0)
    model = CaptionModel(small_cfg()).eval()
    bef, changed, distractor = _features(1)
    found = probe_encoder.probe(model, bef, changed, distractor)

    def encode(aft):
        with torch.no_grad():
            return model.encode(bef, aft).out  # (B, N, emb)

    same, out = encode(bef), encode(changed)
    ratios = [float(torch.linalg.norm(out[b] - same[b]) / torch.linalg.norm(same[b])) for b in range(len(bef))]
    assert found["change"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert found["active"] == pytest.approx(sum(float(v > 0) for v in out.flatten()) / out.numel())
    assert 0 < found["active"] < 1 and found["units_alive"] == 1.0
    assert 0 < found["entropy"] < math.log(12) + 1e-6 and found["uniform"] == pytest.approx(math.log(12))

    with torch.no_grad():  # every unit of the final ReLU dead: nothing reaches the decoder
        model.change_detector.embed_fc[0].bias.fill_(-1e4)
    dead = probe_encoder.probe(model, bef, changed, distractor)
    assert dead["active"] == 0 and dead["units_alive"] == 0 and dead["change"] is None


def test_command_line_on_a_trained_experiment(trained_experiment, tmp_path, capsys):
    config = write_cfg(trained_experiment, tmp_path)
    probe_encoder.main(["--cfg", config, "--snapshot", "last", "--scenes", "4"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("snapshot 2: output values > 0 ") and line.endswith("(4 test scenes)"), line
