"""evaluate.py and utils/eval_utils.py on hand-made captions, checked against pycocoevalcap."""
import json
import os
import re
import shutil
import warnings

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

import evaluate
from utils import eval_utils
from utils.eval_utils import (EvalError, change_detection, classify_caption, load_references,
                              ptb_tokenize, score_captions)

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")

# Two scenes per change type; each has change references and no-change references (the _n id).
SCENES = {
    "000000.png": ("color", ["The small red cube turned blue.", "The red cube became blue.",
                             "The tiny red block changed to blue."]),
    "000001.png": ("color", ["The large gray sphere became yellow.",
                             "The big gray ball turned yellow."]),
    "000002.png": ("material", ["The small metal cylinder became rubber.",
                                "The tiny shiny cylinder turned matte."]),
    "000003.png": ("material", ["The large rubber cube became metal.",
                                "The big matte block turned shiny."]),
    "000004.png": ("add", ["The tiny gray thing has been newly placed.",
                           "A small gray object has been added."]),
    "000005.png": ("add", ["A large purple sphere has appeared.",
                           "The big purple ball has been added."]),
    "000006.png": ("drop", ["The large brown rubber cube is missing.",
                            "The big brown cube has disappeared."]),
    "000007.png": ("drop", ["The small cyan sphere is gone.",
                            "The tiny cyan ball is no longer there."]),
    "000008.png": ("move", ["The red metal object changed its location.",
                            "The red block is in a different location."]),
    "000009.png": ("move", ["The small green cylinder moved.",
                            "The tiny green cylinder is in a different location."]),
}
# The scene truth of SCENES for the object-level score: change type, the changed object as it was before the
# change (the added one for add), the new value.
TRUTH = {
    "000000.png": ("color", "small red rubber cube", "blue"),
    "000001.png": ("color", "large gray metal sphere", "yellow"),
    "000002.png": ("material", "small cyan metal cylinder", "rubber"),
    "000003.png": ("material", "large brown rubber cube", "metal"),
    "000004.png": ("add", "small gray rubber sphere", None),
    "000005.png": ("add", "large purple metal sphere", None),
    "000006.png": ("drop", "large brown rubber cube", None),
    "000007.png": ("drop", "small cyan rubber sphere", None),
    "000008.png": ("move", "large red metal cube", None),
    "000009.png": ("move", "large green metal cylinder", None),  # SC_CAPTIONS calls it small
}
NO_CHANGE_REFS = ["Nothing has changed.", "The two scenes seem identical.",
                  "The scene remains the same.", "No change was made."]
# Generated captions: some right, some wrong type, mixed case and punctuation.
SC_CAPTIONS = {
    "000000.png": "the small red cube turned blue",
    "000001.png": "The large gray sphere is missing.",   # wrong type (drop)
    "000002.png": "the small metal cylinder became rubber",
    "000003.png": "the large rubber cube became metal",
    "000004.png": "the tiny gray thing has been newly placed",
    "000005.png": "nothing has changed",                 # missed change
    "000006.png": "the large brown cube is missing",
    "000007.png": "the small cyan sphere is gone",
    "000008.png": "the red object changed its location",
    "000009.png": "the small green cylinder turned red",  # wrong type (color)
}
NSC_CAPTIONS = {
    "000000.png_n": "nothing has changed",
    "000001.png_n": "the scene remains the same",
    "000002.png_n": "the small cylinder moved",            # false alarm (move)
    "000003.png_n": "the two scenes seem identical",
    "000004.png_n": "no change was made",
    "000005.png_n": "nothing has changed",
    "000006.png_n": "the scene remains the same",
    "000007.png_n": "the tiny cyan ball is gone",           # false alarm (drop)
    "000008.png_n": "nothing has changed",
    "000009.png_n": "the two scenes seem identical",
}


def _write_scenes(path, truth=TRUTH):
    """A scenes.json as the generator writes it (the fields the score reads): the changed object second."""
    scenes = []
    for image_id, (change, described, after) in truth.items():
        changed = dict(zip(("size", "color", "material", "shape"), described.split()))
        other = {"size": "large", "color": "blue", "material": "rubber", "shape": "sphere"}
        scenes.append({"image_id": int(image_id[:6]), "change_type": change, "changed_object": 1,
                       "objects": [other, changed], "change": {"after": after} if after else {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scenes": scenes}))
    return str(path)


def _simple_tokens(text):
    # What the PTB tokenizer gives for these plain sentences: lower-case, punctuation dropped.
    return " ".join(re.findall(r"[a-z]+", text.lower()))


@pytest.fixture
def data(tmp_path):
    images, annotations, types = [], [], {}
    for image_id, (change, refs) in SCENES.items():
        types.setdefault(change, []).append(image_id)
        for img, caps in ((image_id, refs), (image_id + "_n", NO_CHANGE_REFS)):
            images.append({"id": img})
            for cap in caps:
                annotations.append({"image_id": img, "caption": cap, "id": len(annotations)})
    anno = tmp_path / "total_change_captions_reformat.json"
    anno.write_text(json.dumps({"images": images, "annotations": annotations}))
    type_file = tmp_path / "type_mapping.json"
    type_file.write_text(json.dumps(types))
    results = tmp_path / "eval_sents"
    for folder, sc in (("SCORER+CBR_sents_1000", SC_CAPTIONS),
                       ("SCORER+CBR_sents_2000", {k: SCENES[k][1][0] for k in SC_CAPTIONS})):
        (results / folder).mkdir(parents=True)
        (results / folder / "sc_results.json").write_text(json.dumps(
            [{"image_id": k, "caption": v} for k, v in sc.items()]))
        (results / folder / "nsc_results.json").write_text(json.dumps(
            [{"image_id": k, "caption": v} for k, v in NSC_CAPTIONS.items()]))
    return {"anno": str(anno), "type_file": str(type_file), "results": results}


def _direct(captions, meteor):
    """All metrics from pycocoevalcap's scorers called directly on hand-tokenized captions."""
    gts, res = {}, {}
    for image_id, caption in captions.items():
        refs = SCENES[image_id][1] if not image_id.endswith("_n") else NO_CHANGE_REFS
        gts[image_id] = [_simple_tokens(r) for r in refs]
        res[image_id] = [_simple_tokens(caption)]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"Bleu_{n + 1}": v for n, v in enumerate(bleu)}
    out["METEOR"] = meteor.compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


def test_ptb_tokenize_matches_pycocoevalcap_rules():
    assert ptb_tokenize(["The red cube, the small one, is missing.", "", "Nothing changed!"]) \
        == ["the red cube the small one is missing", "", "nothing changed"]


def test_classify_caption_on_data_examples():
    examples = {
        "the large brown rubber cube that is in front of the large blue matte cylinder is "
        "missing": "drop",
        "the tiny yellow cylinder turned brown": "color",
        "the small matte object became brown": "color",
        "the small red metal cube became rubber": "material",
        "the big blue sphere turned shiny": "material",
        "the red metal object changed its location": "move",
        "the red block is in a different location": "move",
        "the tiny gray thing has been newly placed": "add",
        "a big cyan cube appeared": "add",
        "the green ball disappeared": "drop",
        "the gray cube is no longer there": "drop",
        "nothing has changed": "no_change",
        "the two scenes seem identical": "no_change",
        "the scene remains the same": "no_change",
        "no change was made": "no_change",
        "the the the": None,
    }
    for caption, label in examples.items():
        assert classify_caption(caption) == label, caption


def test_change_detection_figures():
    image_types = {k: change for k, (change, _) in SCENES.items()}
    det = change_detection(SC_CAPTIONS, NSC_CAPTIONS, image_types)
    assert det["distractor_no_change"] == pytest.approx(8 / 10)
    assert det["change_detected"] == pytest.approx(9 / 10)  # one caption says nothing changed
    assert det["change_type_correct"] == pytest.approx(7 / 10)
    assert det["per_type_correct"] == {"color": 0.5, "material": 1.0, "add": 0.5, "drop": 1.0,
                                       "move": 0.5}


def test_score_captions_equals_direct_scorers(data):
    refs = load_references(data["anno"])
    results = [{"image_id": k, "caption": v} for k, v in {**SC_CAPTIONS, **NSC_CAPTIONS}.items()]
    # The cheap path train.py uses at every snapshot: no METEOR, no SPICE.
    ours = score_captions(results, refs, metrics=("Bleu", "CIDEr"))
    assert list(ours) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"]
    gts = {k: [_simple_tokens(r) for r in refs[k]] for k in refs}
    res = {k: [_simple_tokens(v)] for k, v in {**SC_CAPTIONS, **NSC_CAPTIONS}.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)


def test_score_captions_rejects_unknown_ids(data):
    refs = load_references(data["anno"])
    with pytest.raises(EvalError, match="999999.png"):
        score_captions([{"image_id": "999999.png", "caption": "x"}], refs, metrics=("Bleu",))


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(EvalError, match="Java is not installed"):
        ptb_tokenize(["a caption"])


def test_evaluate_cli_matches_direct_scorers(data, capsys, monkeypatch):
    spice_missing = not all(os.path.isfile(jar) for jar in eval_utils.spice_jars())
    monkeypatch.setattr(eval_utils, "_SPICE_WARNED", False)
    args = ["--results_dir", str(data["results"]), "--anno", data["anno"],
            "--type_file", data["type_file"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluate.main(args) == 0
    spice_warnings = [w for w in caught if "SPICE" in str(w.message)]
    assert len(spice_warnings) == (1 if spice_missing else 0)
    printed = capsys.readouterr().out
    assert "== eval_sents" not in printed  # folders are named relative to --results_dir
    assert "== SCORER+CBR_sents_1000" in printed and "== best over 2 folder(s)" in printed

    report = json.loads((data["results"] / "eval_results.json").read_text())
    assert (data["results"] / "eval_results.txt").read_text() in printed
    first = report["folders"]["SCORER+CBR_sents_1000"]
    assert first["object_score"] is None and "object-level score" not in printed  # no scene truth
    assert first["scores"]["semantic"]["count"] == 10
    assert first["scores"]["drop"]["count"] == 2
    assert first["scores"]["total"]["count"] == 20
    assert first["change_detection"]["change_type_correct"] == pytest.approx(0.7)

    meteor = Meteor()
    subsets = {
        "semantic": SC_CAPTIONS,
        "non_semantic": NSC_CAPTIONS,
        "total": {**SC_CAPTIONS, **NSC_CAPTIONS},
        "drop": {k: v for k, v in SC_CAPTIONS.items() if SCENES[k][0] == "drop"},
        "color": {k: v for k, v in SC_CAPTIONS.items() if SCENES[k][0] == "color"},
    }
    for split, captions in subsets.items():
        expected = _direct(captions, meteor)
        for name, value in expected.items():
            assert first["scores"][split][name] == pytest.approx(value, abs=1e-9), (split, name)
        if spice_missing:
            assert first["scores"][split]["SPICE"] is None
    # The second folder repeats the first reference of every scene: it wins on every metric
    # of the changed pairs.
    for name in ("Bleu_4", "METEOR", "CIDEr"):
        assert report["best"]["semantic"][name]["folder"] == "SCORER+CBR_sents_2000"
        assert report["best"]["semantic"][name]["value"] == pytest.approx(
            report["folders"]["SCORER+CBR_sents_2000"]["scores"]["semantic"][name])

    # Rerunning on the same folder (its outputs now inside) gives the same report.
    assert evaluate.main(args) == 0
    again = json.loads((data["results"] / "eval_results.json").read_text())
    assert again["folders"] == report["folders"] and again["best"] == report["best"]


@pytest.mark.parametrize("breakage, message", [
    ("empty", "no results found"),
    ("bad_json", "is not valid JSON"),
    ("no_nsc", "no nsc_results.json"),
    ("not_a_list", "expected a JSON list"),
    ("unknown_id", "has no reference caption"),
    ("distractor_in_sc", "is misplaced"),
])
def test_evaluate_cli_rejects_bad_results(data, capsys, breakage, message):
    folder = data["results"] / "SCORER+CBR_sents_1000"
    sc_file = folder / "sc_results.json"
    if breakage == "empty":
        shutil.rmtree(data["results"])
        data["results"].mkdir()
    elif breakage == "bad_json":
        sc_file.write_text('[{"image_id": "000000.png", ')
    elif breakage == "no_nsc":
        (folder / "nsc_results.json").unlink()
    elif breakage == "not_a_list":
        sc_file.write_text('{"000000.png": "a caption"}')
    elif breakage == "unknown_id":
        sc_file.write_text('[{"image_id": "123456.png", "caption": "a caption"}]')
    elif breakage == "distractor_in_sc":
        sc_file.write_text('[{"image_id": "000000.png_n", "caption": "a caption"}]')
    code = evaluate.main(["--results_dir", str(data["results"]), "--anno", data["anno"],
                          "--type_file", data["type_file"]])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (data["results"] / "eval_results.json").exists()


def test_a_missing_results_folder_points_to_the_experiments_that_have_one(tmp_path, capsys):
    (tmp_path / "experiments" / "SCORER+CBR_quick" / "eval_sents").mkdir(parents=True)
    missing = str(tmp_path / "experiments" / "SCORER+CBR" / "eval_sents")
    argv = ["--results_dir", missing, "--anno", "data/total_change_captions_reformat.json",
            "--type_file", "data/type_mapping.json"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert f"results folder {missing} does not exist; these experiments have one: python evaluate.py " \
           f"--results_dir {tmp_path}/experiments/SCORER+CBR_quick/eval_sents --anno " in err


def test_reference_captions_from_the_two_caption_files_have_the_data_md_format(tiny_data, tmp_path):
    from utils.eval_utils import build_references
    from scripts.make_reference_captions import main

    out = tmp_path / "total_change_captions_reformat.json"
    assert main(["--input_captions_json", tiny_data["change_captions"], "--input_neg_captions_json",
                 tiny_data["no_change_captions"], "--output_json", str(out)]) == 0
    built = json.loads(out.read_text())
    generated = json.loads(open(tiny_data["anno"]).read())
    assert built["images"] == generated["images"] and built["annotations"] == generated["annotations"]
    # DATA.md: "000123.png" holds the change captions, "000123.png_n" the no-change ones;
    # annotations {"caption", "id", "image_id"} with ids 0, 1, 2, ...
    change = json.loads(open(tiny_data["change_captions"]).read())
    first = sorted(change)[0]
    scene = re.search(r"(\d+)\.png$", first).group(1)
    refs = load_references(str(out))
    assert refs[f"{scene}.png"] == change[first]
    assert refs[f"{scene}.png_n"] == json.loads(open(tiny_data["no_change_captions"]).read())[first]
    assert all(set(a) == {"caption", "id", "image_id"} for a in built["annotations"])
    assert [a["id"] for a in built["annotations"]] == list(range(len(built["annotations"])))
    with pytest.raises(EvalError, match="is not an image file name"):
        build_references({"notes.txt": ["x"]}, {}, "bad")


# SC_CAPTIONS judged against TRUTH, worked out by hand per change type:
# (right type, right object: colour and shape, right object: all named, new value, all right)
OBJECT_FIGURES = {"color": (0.5, 1.0, 1.0, 0.5, 0.5),  # 000001 is read as a drop: no new colour named
                  "material": (1.0, 1.0, 1.0, 1.0, 1.0),
                  "add": (0.5, 0.5, 0.5, 0.5, 0.5),  # 000005 says nothing changed
                  "drop": (1.0, 1.0, 1.0, None, 1.0),
                  "move": (0.5, 1.0, 0.5, None, 0.5)}  # 000009: read as a colour change, the size wrong


@pytest.mark.filterwarnings("ignore:SPICE skipped")
def test_object_level_score_from_the_scenes_beside_the_annotations(data, capsys):
    scenes = _write_scenes(data["results"].parent / "scenes.json")
    assert evaluate.main(["--results_dir", str(data["results"]), "--anno", data["anno"],
                          "--type_file", data["type_file"]]) == 0
    printed = capsys.readouterr().out
    report = json.loads((data["results"] / "eval_results.json").read_text())
    assert report["scenes"] == scenes
    score = report["folders"]["SCORER+CBR_sents_1000"]["object_score"]
    names = ("right_type", "object_color_shape", "object_named", "new_value", "all_right")
    for change, figures in OBJECT_FIGURES.items():
        assert score["per_type"][change] == {"pairs": 2, **dict(zip(names, figures))}, change
    assert score["figures"] == pytest.approx(dict(zip(names, (0.7, 0.9, 0.8, 4 / 6, 0.7))))
    # The right-type share is the change-detection figure of the same captions.
    assert score["figures"]["right_type"] == report["folders"]["SCORER+CBR_sents_1000"]["change_detection"][
        "change_type_correct"]
    # Sizes named in 8 captions, 7 of them right (000009); shapes in 7 (000008 says "object"), all right.
    assert score["attributes"]["size"] == pytest.approx({"named": 0.8, "right": 7 / 8})
    assert score["attributes"]["shape"] == pytest.approx({"named": 0.7, "right": 1.0})
    table = printed.split("== SCORER+CBR_sents_1000")[1].split("== SCORER+CBR_sents_2000")[0]
    assert f"object-level score against {scenes}: % of the changed pairs" in table
    assert "  color          2      50.00     100.00     100.00      50.00      50.00" in table
    assert "  drop           2     100.00     100.00     100.00          -     100.00" in table
    assert "changed         10      70.00      90.00      80.00      66.67      70.00" in table
    assert (data["results"] / "eval_results.txt").read_text() in printed


@pytest.mark.parametrize("breakage, message", [
    ("missing", "scenes file {scenes} does not exist; pass (--scenes) the scenes.json"),
    ("no_scene", "scenes file {scenes} has no scene for 1 of the 10 changed pairs (e.g. ['000009.png'])"),
    ("other_type", "scenes file {scenes} says 000000.png is a drop change, the type file a color change"),
    ("bad_scene", "scenes file {scenes}: scene 3: changed_object 1 is not an index of its 1 objects"),
])
def test_evaluate_cli_rejects_an_unusable_scenes_file(data, tmp_path, capsys, breakage, message):
    scenes = tmp_path / "elsewhere" / "scenes.json"
    if breakage == "no_scene":
        _write_scenes(scenes, {k: v for k, v in TRUTH.items() if k != "000009.png"})
    elif breakage == "other_type":
        _write_scenes(scenes, {**TRUTH, "000000.png": ("drop", "small red rubber cube", None)})
    elif breakage == "bad_scene":
        _write_scenes(scenes)
        records = json.loads(scenes.read_text())
        records["scenes"][3]["objects"] = records["scenes"][3]["objects"][:1]
        scenes.write_text(json.dumps(records))
    code = evaluate.main(["--results_dir", str(data["results"]), "--anno", data["anno"],
                          "--type_file", data["type_file"], "--scenes", str(scenes)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: " + message.format(scenes=scenes)), err
    assert not (data["results"] / "eval_results.json").exists()


def _write_config(folder, anno, type_file):
    """A config.yaml as train.py writes it into an experiment folder (the keys evaluate.py reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(f"data:\n  anno_json: {anno}\n  type_mapping_json: {type_file}\n")
    return str(folder / "config.yaml")


def test_the_annotation_and_type_files_default_to_the_experiments_config(data, tmp_path, capsys):
    # data["results"] is tmp_path/eval_sents: tmp_path is its experiment folder.
    config = _write_config(tmp_path, data["anno"], data["type_file"])
    assert evaluate.data_files(str(data["results"]), None, None) == (data["anno"], data["type_file"])
    assert evaluate.data_files(str(data["results"]), data["anno"], None) == (data["anno"], data["type_file"])
    # A file given that does not exist: the message names the experiment's files and the command that works.
    argv = ["--results_dir", str(data["results"]), "--anno", "./data/total_change_captions_reformat.json"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: annotation file ./data/total_change_captions_reformat.json (--anno) does not exist. The "
                   f"experiment was trained with the files of {config}: python evaluate.py --results_dir "
                   f"{data['results']} --anno {data['anno']} --type_file {data['type_file']}\n")
    # A config that names files that are not there.
    _write_config(tmp_path, tmp_path / "gone.json", data["type_file"])
    with pytest.raises(EvalError, match=rf"annotation file {tmp_path}/gone.json \(data.anno_json of {config}\) "
                                        r"does not exist"):
        evaluate.data_files(str(data["results"]), None, None)
    assert not (data["results"] / "eval_results.json").exists()


def test_without_an_experiment_config_the_files_are_needed(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the experiments of ./experiments are named
    _write_config(tmp_path / "experiments" / "demo", data["anno"], data["type_file"])
    data["results"].rename(tmp_path / "results")
    assert evaluate.main(["--results_dir", "results"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --anno and --type_file are needed (results is not in an experiment folder with a "
                   f"config.yaml to take them from). The experiments' configs point to: experiments/demo/config.yaml: "
                   f"--anno {data['anno']} --type_file {data['type_file']}\n")


def test_a_missing_results_folder_offers_the_other_experiments_with_their_own_files(data, tmp_path, capsys):
    exp_dir = tmp_path / "experiments"
    _write_config(exp_dir / "demo", data["anno"], data["type_file"])
    data["results"].rename(exp_dir / "demo" / "eval_sents")
    missing = str(exp_dir / "SCORER+CBR" / "eval_sents")
    assert evaluate.main(["--results_dir", missing, "--anno", "./data/total_change_captions_reformat.json",
                          "--type_file", "./data/type_mapping.json"]) == 2
    assert capsys.readouterr().err == (
        f"error: results folder {missing} does not exist; these experiments have one: python evaluate.py "
        f"--results_dir {exp_dir}/demo/eval_sents --anno {data['anno']} --type_file {data['type_file']}\n")
