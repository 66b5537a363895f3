"""Synthetic CLEVR-Change generator: layout, consistency with the scene truth, determinism."""
import json
import os

import numpy as np
import pytest

from scripts.generate_synthetic_clevr import main
from tests.helpers import tree_digest
from utils.clevr_objects import COLORS
from utils.synthetic.scenes import BASE_CAMERA, IMAGE_DIRS, IMAGE_NAMES, make_scene
from utils.synthetic.writing import generate
from utils.text import CHANGE_TYPES, CLEVR_CHANGE_WORDS, tokenize

# Words that only captions of one change type use (DATA.md gives the style).
TYPE_WORDS = {
    "add": {"added", "appeared", "placed"},
    "drop": {"missing", "disappeared", "gone", "longer"},
    "move": {"moved", "location"},
}


def _load(paths, key):
    with open(paths[key]) as f:
        return json.load(f)


def test_layout_files_and_ids_agree(tiny_data):
    scenes = _load(tiny_data, "scenes")["scenes"]
    ids = [s["image_id"] for s in scenes]
    assert ids == list(range(40))
    for folder in ("images", "sc_images", "nsc_images"):
        names = sorted(os.listdir(tiny_data[folder]))
        assert len(names) == len(ids) and all(n.endswith(".png") for n in names)
    for name, sub in IMAGE_DIRS.items():
        for i in ids:
            assert os.path.isfile(os.path.join(tiny_data["root"], sub, IMAGE_NAMES[name] % i))

    splits = _load(tiny_data, "splits")
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (34, 2, 4)

    # Equal contiguous blocks of ids per change type, as in the real data.
    mapping = _load(tiny_data, "type_mapping")
    assert list(mapping) == list(CHANGE_TYPES)
    for k, t in enumerate(CHANGE_TYPES):
        assert mapping[t] == ["%06d.png" % i for i in range(8 * k, 8 * k + 8)]

    change = _load(tiny_data, "change_captions")
    no_change = _load(tiny_data, "no_change_captions")
    keys = [IMAGE_NAMES["default"] % i for i in ids]
    assert sorted(change) == keys and sorted(no_change) == keys
    assert all(5 <= len(change[k]) <= 6 and len(no_change[k]) == 6 for k in keys)

    coco = _load(tiny_data, "anno")
    image_ids = {im["id"] for im in coco["images"]}
    assert image_ids == {"%06d.png" % i for i in ids} | {"%06d.png_n" % i for i in ids}
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(len(anns)))
    assert {a["image_id"] for a in anns} == image_ids
    assert sum(len(v) for v in change.values()) + sum(len(v) for v in no_change.values()) \
        == len(anns)


def test_captions_use_vocabulary_and_name_the_change(tiny_data):
    vocab = set(CLEVR_CHANGE_WORDS)
    change = _load(tiny_data, "change_captions")
    no_change = _load(tiny_data, "no_change_captions")
    for scene in _load(tiny_data, "scenes")["scenes"]:
        key = IMAGE_NAMES["default"] % scene["image_id"]
        t = scene["change_type"]
        for caption in change[key]:
            words = tokenize(caption)
            assert set(words) <= vocab, caption
            assert len(words) + 2 <= 24, caption
            for other, marks in TYPE_WORDS.items():
                assert bool(set(words) & marks) == (other == t), (t, caption)
            if t in ("color", "material"):
                new = scene["change"]["after"]
                assert words[-1] == new if t == "color" else words[-1] in {
                    "metal": {"metal", "metallic", "shiny"},
                    "rubber": {"rubber", "matte"}}[new], caption
        for caption in no_change[key]:
            assert set(tokenize(caption)) <= vocab, caption


def test_scene_truth_matches_change_type(tiny_data):
    for scene in _load(tiny_data, "scenes")["scenes"]:
        t = scene["change_type"]
        objects = scene["objects"]
        target = objects[scene["changed_object"]]
        boxes = target["boxes"]
        assert 3 <= sum(o["boxes"]["default"] is not None for o in objects) <= 6
        assert all(o["shape"] in ("cube", "sphere", "cylinder") and o["color"] in COLORS
                   for o in objects)
        if t == "add":
            assert boxes["default"] is None and boxes["nonsemantic"] is None
            assert boxes["semantic"] is not None
        elif t == "drop":
            assert boxes["default"] is not None and boxes["semantic"] is None
        else:
            assert boxes["default"] is not None and boxes["semantic"] is not None
            before, after = scene["change"]["before"], scene["change"]["after"]
            assert before != after
            if t == "color":
                assert before == target["color"] and after in COLORS
            elif t == "material":
                assert {before, after} == {"rubber", "metal"}
            else:
                dist = sum((a - b) ** 2 for a, b in zip(before, after)) ** 0.5
                assert dist >= 1.6


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    generate(str(tmp_path / "a"), 10, seed=3, width=48, height=32, workers=1, supersample=1,
             progress=False)
    generate(str(tmp_path / "b"), 10, seed=3, width=48, height=32, workers=2, supersample=1,
             progress=False)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len(a) == 3 * 10 + 6 and a == b
    generate(str(tmp_path / "c"), 10, seed=4, width=48, height=32, workers=1, supersample=1,
             progress=False)
    assert tree_digest(tmp_path / "c") != a


def test_cli_rejects_too_few_scenes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path), "--num_scenes", "3", "--workers", "1"])
    assert exit_info.value.code == 2
    assert "--num_scenes" in capsys.readouterr().err


def test_viewpoint_shift_scales_the_distractor_camera_and_light():
    offsets, pixel_changes = {}, {}
    for shift in (0.0, 1.0, 3.0):
        records = [make_scene(scene_id, "color", 0, 48, 32, supersample=1, viewpoint_shift=shift)
                   for scene_id in range(6)]
        offsets[shift] = sum(abs(r["cameras"]["nonsemantic"]["azimuth"] - BASE_CAMERA["azimuth"])
                             for _, r in records) / len(records)
        pixel_changes[shift] = sum(np.abs(images["nonsemantic"].astype(float) - images["default"]).mean()
                                   for images, _ in records) / len(records)
        if shift == 0.0:  # no jitter at all: the base camera, and the same light in both later views
            assert all(r["cameras"]["nonsemantic"] == {**BASE_CAMERA, "target": list(BASE_CAMERA["target"])}
                       and r["lights"]["nonsemantic"] == r["lights"]["semantic"] for _, r in records)
    assert offsets[0.0] == 0 < offsets[1.0] < offsets[3.0]
    assert pixel_changes[1.0] < pixel_changes[3.0]
