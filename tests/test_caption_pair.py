"""scripts/caption_pair.py on the tiny trained experiment: a pair of the data set gets the features its extraction
gave and the caption test.py wrote; other images run too; bad input stops with one line and writes nothing."""
import numpy as np
import pytest
import torch
from PIL import Image

from scripts import caption_pair
from tests.helpers import write_cfg
from utils.dataset import RCCDataset

pytestmark = pytest.mark.snippets  # the fixture trains the model


def run(capsys, argv):
    """(exit status, stdout, stderr) of caption_pair.main(argv)."""
    try:
        code = caption_pair.main([str(word) for word in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def printed_caption(out):
    return next(line[len("caption: "):] for line in out.splitlines() if line.startswith("caption: "))


def test_a_pair_of_the_data_is_captioned_as_test_py_captions_it(tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment
    cfg_file = write_cfg(exp["cfg"], tmp_path)
    dataset = RCCDataset(exp["cfg"], "test", verbose=False)
    settings = caption_pair.stored_settings(exp["cfg"], caption_pair.snapshot_path(exp["cfg"], exp["iteration"]))
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        key = f"{int(item['image_id']):06d}.png"
        for after, feature, wrote in (("q_img_path", "q_feat", exp["sc"][key]), ("n_img_path", "n_feat",
                                                                                  exp["nsc"][key + "_n"])):
            # The features the extraction gave these images (random weights: BatchNorm statistics of their folders).
            bef, aft = caption_pair.pair_features(exp["cfg"], settings, item["d_img_path"], item[after],
                                                  torch.device("cpu"))
            assert torch.allclose(bef[0], item["d_feat"], atol=1e-4) and torch.allclose(aft[0], item[feature], atol=1e-4)
            code, out, err = run(capsys, ["--cfg", cfg_file, "--snapshot", "best", item["d_img_path"], item[after]])
            assert code == 0, err
            assert printed_caption(out) == wrote
    figure = tmp_path / "figures" / "pair.png"
    code, out, err = run(capsys, ["--cfg", cfg_file, "--snapshot", exp["iteration"], item["d_img_path"],
                                  item["q_img_path"], "--attention", figure, "gpu_id", "-1"])
    assert code == 0, err
    assert f"attention maps: {figure}" in out and printed_caption(out) == exp["sc"][key]
    with Image.open(figure) as img:
        assert img.format == "PNG" and img.width == caption_pair.FIG_WIDTH * caption_pair.DPI
        assert img.height > 3 * img.width / 2 * 48 / 64  # three rows of two 64 x 48 images
    assert [p.name for p in figure.parent.iterdir()] == ["pair.png"]


def test_images_of_another_size_and_mode_are_resized_as_the_extractor_does(tiny_experiment, tmp_path, capsys):
    rng = np.random.default_rng(0)
    photo, drawing = tmp_path / "photo.jpg", tmp_path / "drawing.png"
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(photo)
    Image.fromarray(rng.integers(0, 256, (300, 200, 4), dtype=np.uint8)).save(drawing)  # RGBA
    code, out, err = run(capsys, ["--cfg", write_cfg(tiny_experiment["cfg"], tmp_path), "--snapshot", "best", photo,
                                  drawing, "--attention", tmp_path / "photo_pair.png"])
    assert code == 0, err
    assert printed_caption(out) and (tmp_path / "photo_pair.png").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "error: after image {tmp}/nothing.png does not exist"),
    ("not_an_image", "error: before image {tmp}/notes.png is not an image that can be read (cannot identify image "
                     "file"),
    ("no_snapshot", "has no snapshot of iteration 99; its snapshots: 2; best on validation: 2. Use: python "
                    "scripts/caption_pair.py --cfg {tmp}/cfg.yaml --snapshot best"),
    ("other_config", "was trained on features of resnet18 layer3, 64x64, random weights (seed 0), but the config "
                     "extracts resnet18 layer3, 64x64, random weights (seed 1) (data.extraction: seed 0 (the config: "
                     "1)): the snapshot comes from another config; pass the --cfg it was trained with"),
    ("figure_format", "error: --attention {tmp}/pair.xyz: matplotlib cannot write .xyz files; give a .png file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_experiment, tmp_path, capsys, case, message):
    exp = tiny_experiment
    item = RCCDataset(exp["cfg"], "test", verbose=False)[0]
    before, after, snapshot, extra = item["d_img_path"], item["q_img_path"], "best", []
    if case == "missing":
        after = tmp_path / "nothing.png"
    elif case == "not_an_image":
        before = tmp_path / "notes.png"
        before.write_text("not an image")
    elif case == "no_snapshot":
        snapshot = "99"
    elif case == "other_config":
        extra = ["data.extraction.seed", "1"]
    figure = tmp_path / ("pair.xyz" if case == "figure_format" else "pair.png")
    code, out, err = run(capsys, ["--cfg", write_cfg(exp["cfg"], tmp_path), "--snapshot", snapshot, before, after,
                                  "--attention", figure, *extra])
    assert code == 2 and "Traceback" not in err and not out
    assert len(err.strip().splitlines()) == 1 and message.format(tmp=tmp_path) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cfg.yaml"] + (["notes.png"] if case == "not_an_image"
                                                                                else []))
