"""research/convert_reference_snapshot.py: a snapshot in the reference code's format (its state dicts and a
pickled yacs model_cfg, no CBR state, no vocabulary) becomes one test.py runs, without unpickling code."""
import json
import os

import pytest
import torch
from yacs.config import CfgNode

import test as test_script
from models.captioner import CaptionModel
from models.loading import load_trained_model
from tests.helpers import SMALL_MODEL, assert_cli_error, run_cli, tiny_cfg, write_cfg
from utils.device import select_device

pytestmark = pytest.mark.snippets


def reference_snapshot(cfg, path, model_cfg_extra=None):
    """A file as the reference code's save_checkpoint writes it, from a freshly built model."""
    torch.manual_seed(3)
    model = CaptionModel(cfg)
    node = CfgNode({"model": {"change_detector": {"att_head": cfg.model.change_detector.att_head, "input_dim": 1026,
                                                  "dropout": 0.1},
                              "speaker": {"att_head": cfg.model.speaker.att_head, "embed_dim": 300},
                              "transformer_decoder": {"share_wd_cls_weight": False}},
                    "exp_name": "reference"})
    node.freeze()
    torch.save({"change_detector_state": model.change_detector.state_dict(),
                "speaker_state": model.speaker.state_dict(), "model_cfg": model_cfg_extra or node}, path)
    return model.eval()


def test_a_reference_snapshot_converts_and_captions_as_the_original(tiny_data, tmp_path):
    source = tiny_cfg(tiny_data, **SMALL_MODEL)
    original = reference_snapshot(source, tmp_path / "SCORER+CBR_checkpoint_7000.pt")
    # The target config has the paper's dimensions: the converter takes them from the weights.
    target = tiny_cfg(tiny_data, exp_dir=str(tmp_path / "experiments"), exp_name="from_reference")
    cfg_file = write_cfg(target, tmp_path)
    done = run_cli("research/convert_reference_snapshot.py", "--snapshot", tmp_path / "SCORER+CBR_checkpoint_7000.pt",
                   "--cfg", cfg_file, "--vocab_json", tiny_data["vocab"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"test it with: python test.py --cfg {cfg_file} --snapshot 7000" in done.stdout

    model, idx_to_word, model_cfg = load_trained_model(target, 7000, select_device(-1))
    assert model_cfg.model.change_detector.att_dim == 32 and model_cfg.model.speaker.word_dim == 16
    batch = {k: torch.randn(3, 256, 4, 4) for k in ("d", "q")}
    assert torch.equal(model.generate(batch["d"], batch["q"])[0], original.generate(batch["d"], batch["q"])[0])
    out_dir = test_script.run_test(target, 7000)
    assert json.load(open(os.path.join(out_dir, "sc_results.json")))
    # Converted once: a second conversion into the same place would overwrite it.
    again = run_cli("research/convert_reference_snapshot.py", "--snapshot", tmp_path / "SCORER+CBR_checkpoint_7000.pt",
                    "--cfg", cfg_file, "--vocab_json", tiny_data["vocab"])
    assert_cli_error(again, "exists already")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_reference_snapshot_is_refused(tiny_data, tmp_path):
    marker = tmp_path / "code_ran"
    reference_snapshot(tiny_cfg(tiny_data, **SMALL_MODEL), tmp_path / "evil_100.pt",
                       model_cfg_extra=_RunsCodeWhenUnpickled(str(marker)))
    done = run_cli("research/convert_reference_snapshot.py", "--snapshot", tmp_path / "evil_100.pt",
                   "--cfg", write_cfg(tiny_cfg(tiny_data), tmp_path), "--vocab_json", tiny_data["vocab"])
    assert_cli_error(done, "cannot be read as a reference snapshot", "only tensors, plain values and yacs configs")
    assert not marker.exists()


def test_a_file_that_is_not_a_reference_snapshot(tiny_data, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other_5.pt")
    done = run_cli("research/convert_reference_snapshot.py", "--snapshot", tmp_path / "other_5.pt",
                   "--cfg", write_cfg(tiny_cfg(tiny_data), tmp_path), "--vocab_json", tiny_data["vocab"])
    assert_cli_error(done, "is not a snapshot of the reference code: it lacks change_detector_state, speaker_state, "
                           "model_cfg")
