"""Triplet figures from a tiny trained snapshot: files, sizes, captions and scene selection."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import visualize
from utils.dataset import RCCDataset
from utils.eval_utils import classify_caption
from utils.object_score import judge, load_scenes, scene_truth
from utils.text import CHANGE_TYPES
from models.loading import load_trained_model



@pytest.mark.snippets  # the fixture trains the model
def test_per_type_figures_match_the_test_captions(tiny_experiment, tmp_path):  # noqa: F811
    exp = tiny_experiment
    entries = visualize.make_figures(exp["cfg"], exp["iteration"], per_type=1, output_dir=str(tmp_path),
                                     attention=True)
    dataset = RCCDataset(exp["cfg"], "test")
    present = sorted({CHANGE_TYPES[t] for t in dataset.change_types})
    assert sorted(e["change_type"] for e in entries) == present  # one scene of every type in the split
    index = json.loads((tmp_path / visualize.INDEX_FILE).read_text())
    assert [e["file"] for e in index] == [e["file"] for e in entries]
    truths = load_scenes(exp["data"]["scenes"])  # the tiny data set is synthetic: judged on the object too
    for entry in index:
        key = f"{entry['scene_id']:06d}.png"
        # Greedy decoding from the same snapshot: the figure shows what test.py wrote.
        assert entry["changed_caption"] == exp["sc"][key]
        assert entry["distractor_caption"] == exp["nsc"][key + "_n"]
        assert entry["changed_right_type"] == (entry["changed_read_as"] == entry["change_type"])
        assert entry["changed_object"] == judge(entry["changed_caption"], truths[key])
        assert entry["changed_right"] == (entry["changed_right_type"] and entry["changed_object"]["all_right"])
        assert entry["distractor_right"] == (entry["distractor_read_as"] == "no_change")
        assert entry["references"]["changed"] and entry["references"]["distractor"]
        with Image.open(tmp_path / entry["file"]) as img:
            assert img.format == "PNG"
            assert img.width == int(visualize.FIG_WIDTH * visualize.DPI)
            assert img.height > 3 * img.width * 48 / 64 / 3  # three rows of 64 x 48 images


@pytest.mark.snippets  # the fixture trains the model
def test_attention_rows_add_two_image_rows(tiny_experiment, tmp_path):  # noqa: F811
    exp = tiny_experiment
    scene = RCCDataset(exp["cfg"], "test").ids[0]
    plain = visualize.make_figures(exp["cfg"], exp["iteration"], ids=[scene], output_dir=str(tmp_path / "a"))
    rich = visualize.make_figures(exp["cfg"], exp["iteration"], ids=[scene], output_dir=str(tmp_path / "b"),
                                  attention=True)
    with Image.open(tmp_path / "a" / plain[0]["file"]) as a, Image.open(tmp_path / "b" / rich[0]["file"]) as b:
        panel = visualize.FIG_WIDTH / 3 * 48 / 64 + 0.45  # inches of one image row with its title
        assert abs((b.height - a.height) - 2 * panel * visualize.DPI) <= 1
        assert a.width == b.width


@pytest.mark.snippets  # the fixture trains the model
def test_attention_maps_cover_the_feature_grid(tiny_experiment):  # noqa: F811
    exp = tiny_experiment
    model, idx_to_word, model_cfg = load_trained_model(exp["cfg"], exp["iteration"], torch.device("cpu"))
    dataset = RCCDataset(model_cfg, "test")
    records = visualize.caption_scenes(model, dataset, [0, 1], idx_to_word, torch.device("cpu"))
    H, W = dataset.feature_shape[1:]
    for record in records:
        assert record["grid"] == [H, W]
        for pair in ("changed", "distractor"):
            maps = record[pair]
            assert all(maps[k].shape == (H, W) for k in ("enc_before", "enc_after", "decoder"))
            assert np.isclose(maps["decoder"].sum(), 1.0, atol=1e-4)  # a distribution over the grid
            # Every token's attention sums to 1, so the attention received sums to N.
            assert np.isclose(maps["enc_after"].sum(), H * W, rtol=1e-4)


@pytest.mark.snippets  # the fixture trains the model
def test_scene_selection(tiny_experiment):  # noqa: F811
    dataset = RCCDataset(tiny_experiment["cfg"], "test")
    assert visualize.select_indices(dataset, ids=[dataset.ids[1]]) == [1]
    first = visualize.select_indices(dataset, random_n=2, seed=3)
    assert first == visualize.select_indices(dataset, random_n=2, seed=3) and len(set(first)) == 2
    with pytest.raises(visualize.VisualizeError, match="not in the 'test' split"):
        visualize.select_indices(dataset, ids=[10 ** 6])
    with pytest.raises(visualize.VisualizeError, match="--random must be between 1 and"):
        visualize.select_indices(dataset, random_n=len(dataset) + 1)
    with pytest.raises(visualize.VisualizeError, match="exactly one of"):
        visualize.select_indices(dataset, ids=[dataset.ids[0]], per_type=1)


@pytest.mark.snippets  # the fixture trains the model
def test_cli_draws_and_reports_a_missing_snapshot(tiny_experiment, tmp_path, capsys):  # noqa: F811
    exp = tiny_experiment
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(exp["cfg"].dump())
    scene = RCCDataset(exp["cfg"], "test").ids[0]
    out = tmp_path / "figs"
    assert visualize.main(["--cfg", str(cfg_file), "--snapshot", str(exp["iteration"]), "--ids", str(scene),
                           "--output_dir", str(out), "gpu_id", "-1"]) == 0
    assert (out / f"triplet_test_{scene:06d}.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        visualize.main(["--cfg", str(cfg_file), "--snapshot", "99", "--per_type", "1"])
    assert exit_info.value.code == 2
    assert f"no snapshot of iteration 99; its snapshots: {exp['iteration']}" in capsys.readouterr().err
    assert visualize.main(["--cfg", str(cfg_file), "--snapshot", "best", "--ids", str(scene),
                           "--output_dir", str(out)]) == 0


def test_ids_are_followed_by_config_overrides():
    args = visualize.parse_args(["--cfg", "c.yaml", "--snapshot", "5", "--ids", "12", "40", "exp_dir", "/x"])
    assert args.ids == [12, 40] and args.opts == ["exp_dir", "/x"]
    args = visualize.parse_args(["--cfg", "c.yaml", "--snapshot", "5", "--random", "3", "seed", "7"])
    assert args.random_n == 3 and args.opts == ["seed", "7"]
    with pytest.raises(SystemExit):
        visualize.parse_args(["--cfg", "c.yaml", "--snapshot", "5", "--ids", "exp_dir", "/x"])


# A material change of a green metal cube (the first object); a small red rubber cylinder stands beside it.
MATERIAL_SCENE = {"image_id": 3, "change_type": "material", "changed_object": 0, "change": {"after": "rubber"},
                  "objects": [{"size": "large", "color": "green", "material": "metal", "shape": "cube"},
                              {"size": "small", "color": "red", "material": "rubber", "shape": "cylinder"}]}
ADD_SCENE = {"image_id": 4, "change_type": "add", "changed_object": 1, "change": {},
             "objects": [MATERIAL_SCENE["objects"][1],
                         {"size": "large", "color": "purple", "material": "metal", "shape": "sphere"}]}


@pytest.mark.parametrize("scene, caption, verdict, text", [
    # The example: the change type is right, the object is another one.
    (MATERIAL_SCENE, "the small red rubber cylinder was changed to rubber", "right type, wrong object",
     "RIGHT TYPE, WRONG OBJECT (read as material; true: the large green metal cube, now rubber)"),
    (MATERIAL_SCENE, "the green block turned matte", "right", "RIGHT (read as material; right object and new value)"),
    (MATERIAL_SCENE, "the green cube became shiny", "right type, wrong new value",
     "RIGHT TYPE, WRONG NEW VALUE (read as material; true: the large green metal cube, now rubber)"),
    (MATERIAL_SCENE, "the red cylinder became metal", "right type, wrong object and new value",
     "RIGHT TYPE, WRONG OBJECT AND NEW VALUE (read as material; true: the large green metal cube, now rubber)"),
    (MATERIAL_SCENE, "the green cube turned red", "wrong type", "WRONG (read as color, true: material)"),
    (MATERIAL_SCENE, "nothing has changed", "wrong type", "WRONG (read as no change, true: material)"),
    (ADD_SCENE, "a large shiny ball has appeared", "right", "RIGHT (read as add; right object)"),
    (ADD_SCENE, "the small red cylinder has been added", "right type, wrong object",
     "RIGHT TYPE, WRONG OBJECT (read as add; true: the added large purple metal sphere)"),
    (None, "the small red rubber cylinder was changed to rubber", "right", "RIGHT (read as material)"),
])
def test_the_changed_pair_is_right_only_with_the_right_object(scene, caption, verdict, text):
    record = {"scene_id": 3, "change_type": (scene or MATERIAL_SCENE)["change_type"],
              "changed": {"caption": caption, "read_as": classify_caption(caption)},
              "distractor": {"caption": "nothing has changed", "read_as": "no_change"}}
    visualize.judge_record(record, scene_truth(scene) if scene else None)
    changed = record["changed"]
    assert changed["verdict"] == verdict and changed["right"] == (verdict == "right")
    assert record["distractor"]["right"]
    lines = visualize._text_lines(dict(record, references={"changed": [], "distractor": []}), "title", False)
    end = next(i for i, line in enumerate(lines) if line[0].startswith("Generated (before → distractor)"))
    shown = " ".join(" ".join(line[0].split()) for line in lines[1:end])  # the changed pair, wrapped
    assert shown == f'Generated (before → changed): "{caption}" {text}'
    colour = {"right": visualize.RIGHT, "wrong type": visualize.WRONG}.get(verdict, visualize.PARTLY)
    assert {line[1] for line in lines[1:end]} == {colour}
