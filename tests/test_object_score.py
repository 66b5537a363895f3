"""The object-level score (utils/object_score.py) on hand-written captions and scenes, and on the generator's
own reference captions."""
import json

import pytest

from utils.eval_utils import EvalError
from utils.object_score import judge, load_scenes, object_scores, parse_caption, scene_truth

# (caption, subject it names, new value it names)
PARSES = [
    ("the small red rubber cube turned blue",
     {"size": ("small",), "color": ("red",), "material": ("rubber",), "shape": ("cube",)}, ("color", "blue")),
    ("The tiny shiny block that is in front of the big blue ball became matte.",
     {"size": ("small",), "material": ("metal",), "shape": ("cube",)}, ("material", "rubber")),
    ("there is a big metallic thing newly placed", {"size": ("large",), "material": ("metal",)}, None),
    ("the red thing that is behind the green cylinder was made yellow", {"color": ("red",)}, ("color", "yellow")),
    ("the large cylinder changed its location", {"size": ("large",), "shape": ("cylinder",)}, None),
    ("a tiny gray object has appeared", {"size": ("small",), "color": ("gray",)}, None),
    ("the cube", {"shape": ("cube",)}, None),
    ("the red blue sphere is gone", {"color": ("red", "blue"), "shape": ("sphere",)}, None),
    ("the matte object has changed to shiny", {"material": ("rubber",)}, ("material", "metal")),
    ("nothing has changed", {}, None),
    ("the two scenes seem identical", {}, None),
    ("there is no change", {}, None),
    ("", {}, None),
]


@pytest.mark.parametrize("caption, subject, new", PARSES)
def test_parse_caption_reads_the_subject_and_the_new_value(caption, subject, new):
    mention = parse_caption(caption)
    assert mention.subject == subject and mention.new == new


def _scene(change, objects, changed, after=None, image_id=0):
    """A scenes.json record as the generator writes it (only the fields the score reads, plus a box)."""
    keys = ("size", "color", "material", "shape")
    return {"image_id": image_id, "change_type": change, "changed_object": changed,
            "objects": [dict(zip(keys, o.split()), boxes={}) for o in objects],
            "change": {} if after is None else {"after": after}}


# One scene per change type; the changed object is the first, a landmark the second.
SCENES = {
    "color": _scene("color", ["small yellow rubber sphere", "large red metal cylinder"], 0, "cyan"),
    "material": _scene("material", ["large green metal cube", "small red rubber cylinder"], 0, "rubber"),
    "add": _scene("add", ["small red rubber cube", "large purple metal cylinder"], 1),
    "drop": _scene("drop", ["small gray rubber cube", "large red rubber sphere"], 0),
    "move": _scene("move", ["large brown metal sphere", "small blue rubber cube"], 0),
}
T, F, N = True, False, None
# (change, caption, right_type, object_color_shape, object_named, new_value, all_right)
VERDICTS = [
    ("material", "the large green metal cube became rubber", T, T, T, T, T),
    ("material", "the green block turned matte", T, T, T, T, T),  # synonyms, partial mention
    ("material", "the cube became rubber", T, T, T, T, T),  # names the shape only
    # The example: right type, another object.
    ("material", "the small red rubber cylinder was changed to rubber", T, F, F, T, F),
    ("material", "the green cylinder turned rubber", T, F, F, T, F),  # right colour, wrong shape
    ("material", "the big rubber cube became metal", T, T, F, F, F),  # its material after, not before
    ("material", "the green cube that is in front of the small red rubber cylinder turned rubber", T, T, T, T, T),
    ("material", "the red cylinder that is in front of the green cube turned rubber", T, F, F, T, F),
    ("material", "the thing turned rubber", T, F, F, T, F),  # names nothing: fits every object
    ("material", "nothing has changed", F, F, F, F, F),
    ("material", "the green cube turned blue", F, T, T, F, F),
    ("color", "the tiny yellow ball turned cyan", T, T, T, T, T),
    ("color", "the small yellow sphere became yellow", T, T, T, F, F),
    ("color", "the cyan sphere turned cyan", T, F, F, T, F),  # described by its colour after the change
    ("color", "the small matte object was made cyan", T, T, T, T, T),
    ("add", "there is a big purple cylinder newly placed", T, T, T, T, T),
    ("add", "a large shiny thing has appeared", T, T, T, T, T),
    ("add", "a small purple cylinder has been added", T, T, F, F, F),
    ("add", "the purple cube has been added", T, F, F, F, F),
    ("add", "the small red cube has been added", T, F, F, F, F),  # the object that was there before
    ("drop", "the tiny gray block is missing", T, T, T, N, T),
    ("drop", "the gray sphere is gone", T, F, F, N, F),
    ("drop", "the gray cube that is behind the large red sphere disappeared", T, T, T, N, T),
    ("drop", "the large red sphere is no longer there", T, F, F, N, F),  # the landmark, not the dropped object
    ("drop", "the small gray cube changed its location", F, T, T, N, F),
    ("move", "the big brown ball moved", T, T, T, N, T),
    ("move", "the brown metallic object is in a different location", T, T, T, N, T),
    ("move", "the large brown rubber sphere moved", T, T, F, N, F),
    ("move", "nothing has changed", F, F, F, N, F),
]


@pytest.mark.parametrize("change, caption, right_type, color_shape, named, new_value, all_right", VERDICTS)
def test_judge_hand_written_captions(change, caption, right_type, color_shape, named, new_value, all_right):
    assert judge(caption, scene_truth(SCENES[change])) == {
        "right_type": right_type, "object_color_shape": color_shape, "object_named": named,
        "new_value": new_value, "all_right": all_right}


def test_object_scores_per_type_overall_and_per_attribute():
    truths = {}
    captions = {}
    for k, (change, caption, *_) in enumerate(VERDICTS):
        image_id = f"{k:06d}.png"
        truths[image_id] = scene_truth(SCENES[change])
        captions[image_id] = caption
    types = {i: t["change_type"] for i, t in truths.items()}
    score = object_scores(captions, truths, types, "scenes.json")
    columns = dict(zip(("right_type", "object_color_shape", "object_named", "new_value", "all_right"), range(5)))
    for change in SCENES:
        rows = [v[2:] for v in VERDICTS if v[0] == change]
        expected = {f: sum(bool(r[c]) for r in rows) / len(rows) for f, c in columns.items()}
        if change in ("drop", "move"):
            expected["new_value"] = None
        assert score["per_type"][change] == pytest.approx({"pairs": len(rows), **expected}), change
    assert score["pairs"] == len(VERDICTS)
    assert score["figures"]["all_right"] == pytest.approx(sum(v[6] for v in VERDICTS) / len(VERDICTS))
    with_new = [v for v in VERDICTS if v[0] in ("color", "material", "add")]  # drop and move name no new value
    assert score["figures"]["new_value"] == pytest.approx(sum(v[5] for v in with_new) / len(with_new))
    # Counted by hand: 22 subjects name a colour, 5 of them another object's (red cylinder twice, cyan
    # sphere, red cube, red sphere).
    assert score["attributes"]["color"] == pytest.approx({"named": 22 / len(VERDICTS), "right": 17 / 22})


def test_the_generators_reference_captions_are_all_right(tiny_data):
    truths = load_scenes(tiny_data["scenes"])
    captions = json.load(open(tiny_data["change_captions"]))
    judged = 0
    for name, references in captions.items():
        truth = truths[name[-len("000000.png"):]]
        for caption in references:
            assert judge(caption, truth)["all_right"], (caption, truth)
            judged += 1
    assert judged >= 5 * len(captions)


def test_a_caption_judged_against_another_scene_is_seldom_right(tiny_data):
    """The score is not fooled by captions of the right kind: each scene's references judged against the
    scene next to it (of the same change type)."""
    truths = load_scenes(tiny_data["scenes"])
    captions = json.load(open(tiny_data["change_captions"]))
    right = total = 0
    ids = sorted(truths)
    for first, second in zip(ids, ids[1:]):
        if truths[first]["change_type"] != truths[second]["change_type"]:
            continue
        for caption in captions[f"CLEVR_default_{first}"]:
            right += judge(caption, truths[second])["all_right"]
            total += 1
    assert total > 100 and right / total < 0.3


def _write(tmp_path, data):
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist; pass (--scenes) the scenes.json"),
    ("not_a_list", "must hold {\"scenes\": [...]}"),
    ("no_id", "a scene has no integer image_id"),
    ("index", "scene 7: changed_object 5 is not an index of its 2 objects"),
    ("colour", "scene 7: the changed object's color 'pink' is not one of"),
    ("after", "scene 7: change.after 'wood' is not one of ('rubber', 'metal')"),
    ("no_key", "scene 7 lacks 'objects' where scripts/generate_synthetic_clevr.py writes it"),
])
def test_load_scenes_rejects_unusable_files(tmp_path, breakage, message):
    scene = dict(SCENES["material"], image_id=7)
    if breakage == "missing":
        path = str(tmp_path / "nowhere.json")
    elif breakage == "not_a_list":
        path = _write(tmp_path, [scene])
    elif breakage == "no_id":
        path = _write(tmp_path, {"scenes": [dict(scene, image_id="7")]})
    elif breakage == "index":
        path = _write(tmp_path, {"scenes": [dict(scene, changed_object=5)]})
    elif breakage == "colour":
        objects = [dict(scene["objects"][0], color="pink"), scene["objects"][1]]
        path = _write(tmp_path, {"scenes": [dict(scene, objects=objects)]})
    elif breakage == "after":
        path = _write(tmp_path, {"scenes": [dict(scene, change={"before": "metal", "after": "wood"})]})
    else:
        path = _write(tmp_path, {"scenes": [{k: v for k, v in scene.items() if k != "objects"}]})
    with pytest.raises(EvalError) as info:
        load_scenes(path)
    assert message in str(info.value) and path in str(info.value)


def test_object_scores_need_a_scene_of_the_same_type_for_every_pair():
    truths = {"000001.png": scene_truth(SCENES["drop"])}
    with pytest.raises(EvalError, match=r"scenes.json has no scene for 1 of the 2 changed pairs \(e.g. \['000002.png'\]\)"):
        object_scores({"000001.png": "x", "000002.png": "y"}, truths, {"000001.png": "drop", "000002.png": "add"},
                      "scenes.json")
    with pytest.raises(EvalError, match="says 000001.png is a drop change, the type file a move change"):
        object_scores({"000001.png": "x"}, truths, {"000001.png": "move"}, "scenes.json")
