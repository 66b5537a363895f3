"""The words of CLEVR-Change: special tokens and their ids, change types, tokenising, encoding, decoding.

The rules follow DATA.md: lower-case; '.' and '?' removed; ',' and ';' become tokens of their
own; split on whitespace; <START> and <END> wrap every encoded caption.
"""
import re

NULL, UNK, START, END = "<NULL>", "<UNK>", "<START>", "<END>"
NULL_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3
SPECIAL_TOKENS = {NULL: NULL_ID, UNK: UNK_ID, START: START_ID, END: END_ID}

# The five kinds of semantic change, in the order the real splits.json groups its ids.
CHANGE_TYPES = ("color", "material", "add", "drop", "move")

# The 72 words of the real CLEVR-Change vocabulary (DATA.md section 1). The synthetic generator
# may use only these, so that models and vocab files carry over between both data sets.
CLEVR_CHANGE_WORDS = tuple("""
a added appeared as ball became been before behind big block blue brown change changed cube
cyan cylinder difference different disappeared front gone gray green has identical in is its
large left location longer made matte metal metallic missing modified moved newly no nothing
object occurred of on placed purple red remains right rubber same scene scenes seem shiny side
small sphere that the there thing tiny to turned two was yellow
""".split())

_DROPPED = re.compile(r"[.?]")
_OWN_TOKEN = re.compile(r"([,;])")


def tokenize(caption):
    """Caption text -> list of word tokens (no <START>/<END>)."""
    text = _DROPPED.sub("", caption.lower())
    text = _OWN_TOKEN.sub(r" \1 ", text)
    return text.split()


def build_vocab(token_lists):
    """Vocabulary {word: index}: the four special tokens, then the sorted distinct words."""
    vocab = dict(SPECIAL_TOKENS)
    words = sorted({w for tokens in token_lists for w in tokens} - set(SPECIAL_TOKENS))
    for word in words:
        vocab[word] = len(vocab)
    return vocab


def encode(tokens, vocab):
    """Tokens -> ids with <START> ... <END>; words outside ``vocab`` become <UNK>.

    Returns (ids, number of unknown words).
    """
    ids = [START_ID]
    unknown = 0
    for word in tokens:
        idx = vocab.get(word, UNK_ID)
        unknown += idx == UNK_ID
        ids.append(idx)
    ids.append(END_ID)
    return ids, unknown


def decode(ids, idx_to_word):
    """Token ids -> caption text: skips <START>, stops at <END> or <NULL>.

    ``idx_to_word`` maps int index -> word (the inverse of the vocab json).
    """
    words = []
    for idx in ids:
        idx = int(idx)
        if idx == START_ID:
            continue
        if idx in (END_ID, NULL_ID):
            break
        words.append(idx_to_word[idx])
    return " ".join(words)
