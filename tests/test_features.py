"""Feature extraction with random weights on a few tiny images."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision

from scripts.extract_features import main
from tests.helpers import extraction_settings
from utils.extraction import (MEAN, STD, ExtractError, build_model, calibrate_batchnorm, color_channels, extract,
                              load_image)

SETTINGS = extraction_settings(model="resnet18", weights="random", image_size=(64, 96))


@pytest.fixture
def few_images(tiny_data, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in sorted(os.listdir(tiny_data["images"]))[:5]:
        with open(os.path.join(tiny_data["images"], name), "rb") as f:
            (folder / name).write_bytes(f.read())
    return folder


def test_names_shape_dtype_and_resume(few_images, tmp_path):
    out = tmp_path / "features"
    stats = extract(str(few_images), str(out), SETTINGS, batch_size=2, device="cpu", progress=False)
    names = sorted(n for n in os.listdir(out) if n.endswith(".npy"))
    assert names == sorted(n + ".npy" for n in os.listdir(few_images))
    assert json.loads((out / "extraction.json").read_text()) == SETTINGS
    feat = np.load(out / names[0])
    assert feat.dtype == np.float32 and feat.shape == (256, 4, 6)  # layer3: stride 16
    assert stats["written"] == 5 and 0.1 < stats["std"] < 100
    # A second run skips what exists; a deleted file is redone identically (same seed).
    os.remove(out / names[0])
    again = extract(str(few_images), str(out), SETTINGS, batch_size=2, device="cpu", progress=False)
    assert again["written"] == 1 and again["skipped"] == 4
    np.testing.assert_allclose(np.load(out / names[0]), feat, rtol=1e-5, atol=1e-5)


def test_output_grid_pools(few_images, tmp_path):
    out = tmp_path / "pooled"
    main(["--input_image_dir", str(few_images), "--output_dir", str(out), "--model", "resnet18",
          "--weights", "random", "--image_height", "64", "--image_width", "64",
          "--output_grid", "2x3", "--max_images", "2", "--device", "cpu"])
    names = sorted(n for n in os.listdir(out) if n.endswith(".npy"))
    assert len(names) == 2 and np.load(out / names[0]).shape == (256, 2, 3)
    assert json.loads((out / "extraction.json").read_text())["output_grid"] == [2, 3]


def test_append_color_adds_eighteen_channels(few_images, tmp_path):
    plain, colored = tmp_path / "plain", tmp_path / "colored"
    for out, extra in ((plain, []), (colored, ["--append_color"])):
        main(["--input_image_dir", str(few_images), "--output_dir", str(out), "--model", "resnet18",
              "--weights", "random", "--image_height", "64", "--image_width", "64", "--output_grid", "2",
              "--max_images", "2", "--device", "cpu", *extra])
    name = sorted(os.listdir(plain))[1]  # after extraction.json
    a, b = np.load(plain / name), np.load(colored / name)
    assert b.shape == (256 + 18, 2, 2)
    np.testing.assert_array_equal(b[:256], a)


def normalised(rgb):
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_color_channels_by_hand():
    # Two cells of 2 x 2 pixels: the left one pure red, the right one grey 0.2 above and 0.6 below.
    rgb = torch.zeros(1, 3, 2, 4)
    rgb[0, 0, :, :2] = 1.0
    rgb[0, :, 0, 2:], rgb[0, :, 1, 2:] = 0.2, 0.6
    out = color_channels(normalised(rgb), (1, 2))[0, :, 0]  # (18, 2)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    torch.testing.assert_close(out[0:3, 0], 3 * (torch.tensor([1.0, 0, 0]) - mean) / std)
    torch.testing.assert_close(out[3:6, 0], torch.zeros(3), atol=1e-3, rtol=0)  # a flat colour
    torch.testing.assert_close(out[3:6, 1], 3 * 0.2 / std, atol=1e-3, rtol=0)  # 0.2 and 0.6: sd 0.2
    red = torch.tensor([2 / 3, -1 / 3, -1 / 3]) * 30
    torch.testing.assert_close(out[6:18, 0], red.repeat_interleave(4))  # every quarter of the red cell
    torch.testing.assert_close(out[6:18, 1], torch.zeros(12), atol=1e-5, rtol=0)  # grey: no chromaticity


def test_color_quarters_locate_a_small_object():
    rgb = torch.full((1, 3, 2, 2), 0.5)
    rgb[0, :, 1, 1] = torch.tensor([0.0, 0.0, 1.0])  # one blue pixel in the lower right quarter
    quarters = color_channels(normalised(rgb), (1, 1))[0, 6:, 0, 0].view(3, 4)  # (channel, quarter)
    torch.testing.assert_close(quarters[:, 3], torch.tensor([-1 / 3, -1 / 3, 2 / 3]) * 30)
    torch.testing.assert_close(quarters[:, :3], torch.zeros(3, 3), atol=1e-5, rtol=0)


def test_batchnorm_calibration_tames_random_network():
    # Residual branches pile up: ResNet-50 layer3 reaches std ~12 with the default statistics
    # (ResNet-101: ~3000).
    torch.manual_seed(0)
    model = build_model("resnet50", 3, "random", seed=0)
    images = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        raw = model(images).std().item()
    calibrate_batchnorm(model, [images])
    with torch.no_grad():
        calibrated = model(images).std().item()
    assert calibrated < 3 and raw > 5 * calibrated


def test_imagenet_weights_unavailable_names_the_file(monkeypatch, few_images, tmp_path):
    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ExtractError) as err:
        build_model("resnet18", 3, "imagenet")
    target = os.path.join(torch.hub.get_dir(), "checkpoints", "resnet18-f37072fd.pth")
    assert target in str(err.value) and "--weights random" in str(err.value)


def test_bad_inputs_are_clear_errors(tmp_path, few_images, capsys):
    with pytest.raises(ExtractError, match="does not exist"):
        extract(str(tmp_path / "nope"), str(tmp_path / "out"), SETTINGS)
    with pytest.raises(SystemExit) as exit_info:
        main(["--input_image_dir", str(few_images), "--output_dir", str(tmp_path / "o"),
              "--model", "resnet18", "--weights", str(tmp_path / "missing.pth")])
    assert exit_info.value.code == 2 and "missing.pth" in capsys.readouterr().err
    (few_images / "CLEVR_default_999999.png").write_bytes(b"not a png")
    with pytest.raises(ExtractError, match="CLEVR_default_999999.png"):
        load_image(str(few_images / "CLEVR_default_999999.png"), 32, 32)


def test_color_weight_scales_the_colour_channels_only():
    images = torch.randn(2, 3, 16, 16)
    assert torch.allclose(color_channels(images, (2, 2), 3.0), 3 * color_channels(images, (2, 2)))


def test_a_folder_of_other_settings_is_refused_and_the_config_gives_settings(few_images, tmp_path, capsys):
    out = tmp_path / "features"
    extract(str(few_images), str(out), SETTINGS, batch_size=5, max_images=1, device="cpu", progress=False)
    with pytest.raises(ExtractError, match="other settings .*resnet18 layer3, 64x96.*layer2"):
        extract(str(few_images), str(out), {**SETTINGS, "stage": 2}, device="cpu", progress=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  extraction:\n    model: resnet18\n    weights: random\n    image_size: [64, 96]\n")
    main(["--input_image_dir", str(few_images), "--output_dir", str(out), "--cfg", str(cfg), "--device", "cpu"])
    assert len([n for n in os.listdir(out) if n.endswith(".npy")]) == 5


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--max_images", "-2"), ("--image_height", "0"),
                                         ("--seed", "-1"), ("--color_weight", "-1"), ("--color_weight", "nan"),
                                         ("--output_grid", "0x7"), ("--output_grid", "7x7x7")])
def test_flags_outside_their_range_are_usage_errors(few_images, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input_image_dir", str(few_images), "--output_dir", str(tmp_path / "o"), flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
