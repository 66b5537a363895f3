"""Object-level score: does a change caption name the object that changed, and its new value?

On data whose scenes are known (the synthetic set's scenes.json, written by
scripts/generate_synthetic_clevr.py) each generated caption of a changed pair is read back:

- its subject, the description the caption starts with ("the small red metal cube", "a big ball",
  "there is a matte thing ..."): the attribute words up to the first shape or "object"/"thing".
  Only the subject counts: in "the red cube that is behind the blue sphere turned green" the blue
  sphere is a landmark. Words mean what utils/clevr_objects.py says (block = cube, ball = sphere,
  shiny and metallic = metal, matte = rubber, tiny = small, big = large, thing and object = any
  shape);
- its new value, the first colour or material word after the change verb ("turned blue", "was
  made shiny").

The truth is the changed object as it was BEFORE the change (color, material, drop, move) or the
added object (add), and the new colour or material. Per changed pair (judge()):

  right_type          the caption names the true change type (utils.eval_utils.classify_caption)
  object_color_shape  the subject names some attribute, and the colour and shape it names (if any)
                      are the object's: "the cube" is right for a red cube, "the blue cube" is not
  object_named        the subject names some attribute, and every attribute it names is the object's
  new_value           color, material: the new value named is the new one; add: as object_named (what
                      is new is the object itself); drop, move: None (nothing new to name)
  all_right           right_type, object_named and new_value (where the change has one)

A subject that names no attribute ("the thing moved", "nothing has changed") is not the right
object: it fits every object in the scene.
"""
import os
import re
from typing import NamedTuple, Optional, Tuple

from utils.clevr_objects import ATTRIBUTES, COLORS, MATERIALS, NOUN_WORDS, SHAPES, SIZE_WORDS, WORD_MEANINGS
from utils.eval_utils import CHANGE_VERBS, EvalError, classify_caption
from utils.fileio import read_json
from utils.text import CHANGE_TYPES

FIGURES = ("right_type", "object_color_shape", "object_named", "new_value", "all_right")
FIGURE_LABELS = {"right_type": "right change type", "object_color_shape": "right object (colour, shape)",
                 "object_named": "right object (all named)", "new_value": "right new value",
                 "all_right": "all right"}
VALUES = {"size": tuple(SIZE_WORDS), "color": tuple(COLORS), "material": MATERIALS, "shape": SHAPES}
NEW_VALUE_OF = {"color": "color", "material": "material"}  # change type -> the attribute it changes
NEW_VALUE_TYPES = ("color", "material", "add")  # the changes with something new to name
SCENES_FILE = "scenes.json"  # the synthetic generator's scene truth, next to the annotations
ARTICLES = ("the", "a")
_FIX = "re-generate the data set with scripts/generate_synthetic_clevr.py"
_WORD = re.compile(r"[a-z]+")


class Mention(NamedTuple):
    """What a caption says about its subject: {attribute: values named, in order}, and the new
    value as (attribute, value) or None."""
    subject: dict
    new: Optional[Tuple[str, str]]


def parse_caption(text):
    """The subject's attributes and the new value a caption names (a Mention)."""
    words = _WORD.findall(text.lower())
    i = 2 if words[:2] == ["there", "is"] else 0
    if i < len(words) and words[i] in ARTICLES:
        i += 1
    subject = {}
    while i < len(words) and (words[i] in WORD_MEANINGS or words[i] in NOUN_WORDS):
        word = words[i]
        i += 1
        if word in NOUN_WORDS:
            break
        attribute, value = WORD_MEANINGS[word]
        subject.setdefault(attribute, []).append(value)
        if attribute == "shape":  # the noun: what follows belongs to a relation or the verb
            break
    new = None
    verb = next((k for k in range(i, len(words)) if words[k] in CHANGE_VERBS), None)
    if verb is not None:
        for word in words[verb + 1:]:
            meaning = WORD_MEANINGS.get(word)
            if meaning is not None and meaning[0] in ("color", "material"):
                new = meaning
                break
    return Mention({a: tuple(v) for a, v in subject.items()}, new)


def scene_truth(scene, source=SCENES_FILE):
    """{"change_type", "object": {attribute: value}, "new": (attribute, value) or None} of one scene
    record of scenes.json; EvalError naming ``source`` and the scene when a field is missing or odd."""
    where = f"{source}: scene {scene.get('image_id', '?') if isinstance(scene, dict) else '?'}"
    try:
        change = scene["change_type"]
        if change not in CHANGE_TYPES:
            raise ValueError(f"change_type {change!r} is not one of {CHANGE_TYPES}")
        objects, k = scene["objects"], scene["changed_object"]
        if not isinstance(k, int) or not 0 <= k < len(objects):
            raise ValueError(f"changed_object {k!r} is not an index of its {len(objects)} objects")
        obj = {attribute: objects[k][attribute] for attribute in ATTRIBUTES}
        for attribute, value in obj.items():
            if value not in VALUES[attribute]:
                raise ValueError(f"the changed object's {attribute} {value!r} is not one of {VALUES[attribute]}")
        new = None
        if change in NEW_VALUE_OF:
            new = (NEW_VALUE_OF[change], scene["change"]["after"])
            if new[1] not in VALUES[new[0]]:
                raise ValueError(f"change.after {new[1]!r} is not one of {VALUES[new[0]]}")
    except (KeyError, TypeError) as err:
        raise EvalError(f"{where} lacks {err} where scripts/generate_synthetic_clevr.py writes it; {_FIX}") from None
    except ValueError as err:
        raise EvalError(f"{where}: {err}; {_FIX}") from None
    return {"change_type": change, "object": obj, "new": new}


def scenes_beside(anno_json):
    """The scenes.json next to the annotation file (synthetic data sets have one), or None."""
    path = os.path.join(os.path.dirname(anno_json), SCENES_FILE)
    return path if os.path.isfile(path) else None


def read_scenes(path):
    """The scene records of a scenes.json (as the generator wrote them); EvalError naming the file when unusable."""
    data = read_json(path, "scenes file", "pass (--scenes) the scenes.json that scripts/generate_synthetic_clevr.py "
                     "wrote next to the annotations", EvalError)
    scenes = data.get("scenes") if isinstance(data, dict) else None
    if not isinstance(scenes, list):
        raise EvalError(f"scenes file {path} must hold {{\"scenes\": [...]}} as scripts/generate_synthetic_clevr.py "
                        f"writes it; {_FIX}")
    return scenes


def load_scenes(path):
    """{image id "000123.png": scene_truth} of a scenes.json; EvalError naming the file when unusable."""
    truths = {}
    for scene in read_scenes(path):
        image_id = scene.get("image_id") if isinstance(scene, dict) else None
        if not isinstance(image_id, int) or image_id < 0:
            raise EvalError(f"scenes file {path}: a scene has no integer image_id ({str(scene)[:80]}); {_FIX}")
        truths[f"{image_id:06d}.png"] = scene_truth(scene, f"scenes file {path}")
    return truths


def judge(caption, truth):
    """{figure: True/False} of one changed pair's caption (new_value None where the change has none)."""
    mention = parse_caption(caption)
    obj, change = truth["object"], truth["change_type"]
    fits = {a: all(v == obj[a] for v in values) for a, values in mention.subject.items()}
    named = bool(fits)
    verdict = {"right_type": classify_caption(caption) == change,
               "object_color_shape": named and fits.get("color", True) and fits.get("shape", True),
               "object_named": named and all(fits.values())}
    if truth["new"] is not None:
        verdict["new_value"] = mention.new == truth["new"]
    elif change == "add":
        verdict["new_value"] = verdict["object_named"]
    else:
        verdict["new_value"] = None
    verdict["all_right"] = (verdict["right_type"] and verdict["object_named"]
                            and verdict["new_value"] is not False)
    return verdict


def describe(truth):
    """The true object in words, e.g. "the large green metal cube, now rubber" or "the added small red ..."."""
    words = " ".join(truth["object"][a] for a in ATTRIBUTES)
    text = f"the added {words}" if truth["change_type"] == "add" else f"the {words}"
    return text + (f", now {truth['new'][1]}" if truth["new"] else "")


def _share(hits, total):
    return hits / total if total else None


def object_scores(sc_results, truths, image_types, scenes_path):
    """The object-level figures of the changed pairs' captions ({image id: caption}).

    Every image id needs a scene in ``truths`` whose change type is the one ``image_types`` gives;
    otherwise EvalError naming ``scenes_path``. Returns {"scenes", "pairs", "figures" (shares over
    every changed pair; new_value over the pairs whose change has one), "per_type" ({type: {"pairs",
    figure: share}}), "attributes" ({attribute: {"named": share of pairs whose subject names it,
    "right": share of those where it is the object's}})}.
    """
    missing = [i for i in sc_results if i not in truths]
    if missing:
        raise EvalError(f"scenes file {scenes_path} has no scene for {len(missing)} of the {len(sc_results)} changed "
                        f"pairs (e.g. {missing[:3]}); pass the scenes.json of the data set the captions come from "
                        f"with --scenes")
    for image_id in sc_results:
        if truths[image_id]["change_type"] != image_types[image_id]:
            raise EvalError(f"scenes file {scenes_path} says {image_id} is a {truths[image_id]['change_type']} change, "
                            f"the type file a {image_types[image_id]} change; pass the scenes.json of the data "
                            f"set the type file belongs to")
    hits = {t: {f: 0 for f in FIGURES} for t in CHANGE_TYPES}
    counts = {t: 0 for t in CHANGE_TYPES}
    named = {a: [0, 0] for a in ATTRIBUTES}  # attribute -> [pairs naming it, of which right]
    for image_id, caption in sc_results.items():
        truth = truths[image_id]
        counts[truth["change_type"]] += 1
        for figure, value in judge(caption, truth).items():
            hits[truth["change_type"]][figure] += bool(value)
        for attribute, values in parse_caption(caption).subject.items():
            named[attribute][0] += 1
            named[attribute][1] += all(v == truth["object"][attribute] for v in values)
    per_type = {t: {"pairs": counts[t], **{f: _share(hits[t][f], counts[t]) for f in FIGURES}} for t in CHANGE_TYPES}
    for t in CHANGE_TYPES:
        if t not in NEW_VALUE_TYPES:
            per_type[t]["new_value"] = None
    total = sum(counts.values())
    figures = {f: _share(sum(hits[t][f] for t in CHANGE_TYPES), total) for f in FIGURES}
    figures["new_value"] = _share(sum(hits[t]["new_value"] for t in NEW_VALUE_TYPES),
                                  sum(counts[t] for t in NEW_VALUE_TYPES))
    return {"scenes": scenes_path, "pairs": total, "figures": figures, "per_type": per_type,
            "attributes": {a: {"named": _share(n, total), "right": _share(r, n)} for a, (n, r) in named.items()}}
