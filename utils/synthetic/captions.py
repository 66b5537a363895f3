"""Captions of the synthetic CLEVR-Change scenes: templates per change type, referring expressions.

Only the 72 words of the real vocabulary are used; the attribute words live in
utils/clevr_objects.py. Objects are described in the camera view of the "before" image (their
camera-space x and depth, as scenes._with_view adds them).
"""
from utils.clevr_objects import ATTRIBUTES, MATERIAL_WORDS, NOUN_WORDS, SHAPE_WORDS, SIZE_WORDS

RELATION_MARGIN = 0.6  # spatial relations are only used when this clear, so jitter cannot flip them
MAX_TOKENS = 22  # longest caption in words: 24 with <START>/<END> = model.speaker.seq_length

RELATIONS = ("in front of", "behind", "on the left side of", "on the right side of")

CHANGE_TEMPLATES = {
    "color": ("{obj} turned {new}", "{obj} became {new}", "{obj} changed to {new}",
              "{obj} has changed to {new}", "{obj} was changed to {new}", "{obj} was made {new}"),
    "material": ("{obj} turned {new}", "{obj} became {new}", "{obj} changed to {new}",
                 "{obj} has changed to {new}", "{obj} was changed to {new}",
                 "{obj} was made {new}"),
    "add": ("{obj} has been added", "{obj} has been newly placed", "{obj} appeared",
            "{obj} has appeared", "{obj} was added", "there is {obj} newly placed"),
    "drop": ("{obj} is missing", "{obj} disappeared", "{obj} has disappeared", "{obj} is gone",
             "{obj} is no longer there"),
    "move": ("{obj} moved", "{obj} has moved", "{obj} changed its location",
             "{obj} has changed its location", "{obj} is in a different location",
             "{obj} was moved to a different location"),
}
NO_CHANGE_CAPTIONS = (
    "nothing has changed", "nothing changed", "nothing was modified", "nothing has been modified",
    "the two scenes seem identical", "the scenes seem identical", "the two scenes seem the same",
    "the scene remains the same", "the scene is the same as before", "no change was made",
    "no change has been made", "no change has occurred", "there is no change",
    "there is no difference", "no change occurred",
)
CAPTIONS_PER_PAIR = 6


def _matches(obj, target, attrs):
    return all(obj[a] == target[a] for a in attrs)


def _attribute_sets():
    sets = []
    for mask in range(1, 16):
        sets.append(tuple(a for i, a in enumerate(ATTRIBUTES) if mask >> i & 1))
    return sets


ATTRIBUTE_SETS = _attribute_sets()


def _phrase(rng, obj, attrs):
    words = []
    if "size" in attrs:
        words.append(SIZE_WORDS[obj["size"]][rng.integers(2)])
    if "color" in attrs:
        words.append(obj["color"])
    if "material" in attrs:
        options = MATERIAL_WORDS[obj["material"]]
        words.append(options[rng.integers(len(options))])
    if "shape" in attrs:
        options = SHAPE_WORDS[obj["shape"]]
        words.append(options[rng.integers(len(options))])
    else:
        words.append(NOUN_WORDS[rng.integers(2)])
    return " ".join(words)


def _relation_holds(rel, target, landmark):
    """Relation of two objects in the camera view (x: right, depth: away)."""
    if rel == "in front of":
        return target["depth"] < landmark["depth"] - RELATION_MARGIN
    if rel == "behind":
        return target["depth"] > landmark["depth"] + RELATION_MARGIN
    if rel == "on the left side of":
        return target["cam_x"] < landmark["cam_x"] - RELATION_MARGIN
    return target["cam_x"] > landmark["cam_x"] + RELATION_MARGIN


def _describe(rng, target_k, scene, force_relation=False):
    """A referring expression (without article) for ``scene[target_k]``.

    Prefers attribute subsets that single the object out in ``scene``; adds a spatial relation
    sometimes, or when attributes alone cannot tell it apart from a twin.
    """
    target = scene[target_k]
    others = [o for k, o in enumerate(scene) if k != target_k]
    unique = [a for a in ATTRIBUTE_SETS if not any(_matches(o, target, a) for o in others)]
    if unique and not force_relation and rng.random() >= 0.25:
        return _phrase(rng, target, unique[rng.integers(len(unique))])
    # Relation "<target> that is <rel> the <landmark>"; the landmark is described uniquely and
    # the relation must separate the target from every object sharing its description.
    attrs = unique[rng.integers(len(unique))] if unique else ATTRIBUTES
    rivals = [o for o in others if _matches(o, target, attrs)]
    options = []
    for lk, landmark in enumerate(scene):
        if lk == target_k:
            continue
        l_unique = [a for a in ATTRIBUTE_SETS
                    if not any(_matches(o, landmark, a) for j, o in enumerate(scene) if j != lk)]
        if not l_unique:
            continue
        for rel in RELATIONS:
            if _relation_holds(rel, target, landmark) and not any(
                    _relation_holds(rel, o, landmark) for o in rivals if o is not landmark):
                options.append((lk, rel, l_unique))
    if not options:
        return _phrase(rng, target, attrs)
    lk, rel, l_unique = options[rng.integers(len(options))]
    l_attrs = l_unique[rng.integers(len(l_unique))]
    return (f"{_phrase(rng, target, attrs)} that is {rel} the "
            f"{_phrase(rng, scene[lk], l_attrs)}")


def _new_value_word(rng, change, value):
    if change == "color":
        return value
    options = MATERIAL_WORDS[value]
    return options[rng.integers(len(options))]


def change_captions(rng, change, target_k, scene, details):
    """About six distinct captions for one change; ``scene`` is where the object is described."""
    captions = []
    for attempt in range(60):
        if len(captions) == CAPTIONS_PER_PAIR:
            break
        templates = CHANGE_TEMPLATES[change]
        template = templates[rng.integers(len(templates))]
        desc = _describe(rng, target_k, scene)
        article = "a" if change == "add" and (template.startswith("there") or rng.random() < 0.3) \
            else "the"
        new = _new_value_word(rng, change, details["after"]) if "after" in details and \
            change in ("color", "material") else ""
        caption = template.format(obj=f"{article} {desc}", new=new)
        if len(caption.split()) > MAX_TOKENS or caption in captions:
            continue
        captions.append(caption)
    return captions


def no_change_captions(rng):
    order = rng.permutation(len(NO_CHANGE_CAPTIONS))[:CAPTIONS_PER_PAIR]
    return [NO_CHANGE_CAPTIONS[i] for i in order]
