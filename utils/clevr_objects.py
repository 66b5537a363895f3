"""CLEVR's objects and the words that name them: attribute values, the colour palette, synonyms.

One home for both directions of the caption vocabulary: the synthetic generator
(scripts/generate_synthetic_clevr.py) writes its referring expressions with these words, and the
object-level score (utils/object_score.py) reads generated captions back with them. Every word is
one of the 72 of the real vocabulary (utils.text.CLEVR_CHANGE_WORDS).
"""
SHAPES = ("cube", "sphere", "cylinder")
# CLEVR's palette (sRGB, 0..255); a colour is named by its key.
COLORS = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
MATERIALS = ("rubber", "metal")

# The words for each value; the first is the value's own name.
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "tiny")}
MATERIAL_WORDS = {"metal": ("metal", "metallic", "shiny"), "rubber": ("rubber", "matte")}
SHAPE_WORDS = {"cube": ("cube", "block"), "sphere": ("sphere", "ball"), "cylinder": ("cylinder",)}
NOUN_WORDS = ("object", "thing")  # a description that names no shape ends with one of these
ATTRIBUTES = ("size", "color", "material", "shape")  # the order of the words in a description


def _word_meanings():
    words = {"size": SIZE_WORDS, "color": {c: (c,) for c in COLORS}, "material": MATERIAL_WORDS,
             "shape": SHAPE_WORDS}
    return {word: (attribute, value) for attribute in ATTRIBUTES
            for value, names in words[attribute].items() for word in names}


# word -> (attribute, value), e.g. "block" -> ("shape", "cube"), "shiny" -> ("material", "metal")
WORD_MEANINGS = _word_meanings()
