"""Caption scoring with the COCO caption metrics, run offline and fast.

pycocoevalcap's COCOEvalCap writes temporary files into its own install folder and returns no
metric at all when SPICE cannot download Stanford CoreNLP. So this module drives the same
scorers itself: the Stanford PTB tokenizer jar (one Java call for every caption), BLEU, ROUGE-L
and CIDEr from pycocoevalcap, and the METEOR jar through one long-lived process. Temporary
files live in a temporary folder. SPICE runs only when the CoreNLP jars it needs are in place.

Scores of many subsets of one set of captions (changed pairs, each change type, distractors,
all together) are computed from one tokenization: per-caption work (tokenizing, METEOR
alignment statistics, ROUGE-L, SPICE) is done once and each subset only aggregates. BLEU and
CIDEr are corpus-level (CIDEr's IDF comes from the subset's references), so they are recomputed
per subset, which is cheap.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import warnings

import numpy as np

from utils.clevr_objects import COLORS, MATERIAL_WORDS
from utils.errors import UserError
from utils.fileio import read_json
from utils.text import CHANGE_TYPES

SCORERS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
CAPTION_CLASSES = ("no_change",) + CHANGE_TYPES

# Tokens the PTB tokenizer produces that are not words (pycocoevalcap drops the same ones).
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_SPICE_WARNED = False


class EvalError(UserError):
    """Input that cannot be evaluated (missing file, wrong format, no Java); the message says why."""


def _package_dir(sub):
    import pycocoevalcap

    # pycocoevalcap is a namespace package: __file__ is None, __path__ holds its folder.
    return os.path.join(list(pycocoevalcap.__path__)[0], sub)


def java_executable():
    """Path of `java`; EvalError saying how to install it when it is not on PATH."""
    java = shutil.which("java")
    if java is None:
        raise EvalError("Java is not installed, but the PTB tokenizer and METEOR of pycocoevalcap "
                        "need it; install a Java runtime (e.g. apt-get install "
                        "default-jre-headless) and make sure `java` is on PATH")
    return java


# --------------------------------------------------------------------------- input files

def _read_json(path, what):
    return read_json(path, what, error=EvalError)


_SCENE_ID = re.compile(r"(\d+)\.png$")


def build_references(change_captions, no_change_captions, description):
    """The COCO caption ground truth (total_change_captions_reformat.json, DATA.md) of the two caption
    files ({"CLEVR_default_000123.png": [captions]}): image "000123.png" holds the change captions,
    "000123.png_n" the no-change captions; annotations {"caption", "id", "image_id"}."""
    names = {}
    for source in (change_captions, no_change_captions):
        for name in source:
            match = _SCENE_ID.search(name)
            if match is None:
                raise EvalError(f"caption key {name!r} is not an image file name ending in <number>.png")
            names[int(match.group(1))] = name
    images, annotations = [], []
    for scene_id in sorted(names):
        for suffix, source in (("", change_captions), ("_n", no_change_captions)):
            captions = source.get(names[scene_id]) or []
            if not captions:
                continue
            image_id = f"{scene_id:06d}.png{suffix}"
            images.append({"id": image_id})
            for caption in captions:
                annotations.append({"caption": caption, "id": len(annotations), "image_id": image_id})
    return {"info": {"description": description}, "licenses": [], "type": "captions", "images": images,
            "annotations": annotations}


def _captions_of(items, path, name):
    """(image id, caption) of each {"image_id": ..., "caption": "..."} in a COCO-style list, checked."""
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("caption"), str) or "image_id" not in item:
            raise EvalError(f"{path}: {name} {i} needs an 'image_id' and a string 'caption'; got {item!r:.200}")
        yield str(item["image_id"]), item["caption"]


def load_references(anno_json):
    """COCO caption ground truth -> {image_id: [caption, ...]}."""
    data = _read_json(anno_json, "annotation file")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise EvalError(f"{anno_json}: expected a COCO caption file, a JSON object with an "
                        f"'annotations' list of {{'image_id', 'caption'}} (e.g. "
                        f"data/total_change_captions_reformat.json)")
    references = {}
    for image_id, caption in _captions_of(annotations, anno_json, "annotation"):
        references.setdefault(image_id, []).append(caption)
    if not references:
        raise EvalError(f"{anno_json}: the 'annotations' list is empty")
    return references


def load_type_mapping(type_file):
    """{change type: [image id "000123.png", ...]} -> {image id: change type}."""
    data = _read_json(type_file, "type file")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise EvalError(f"{type_file}: expected {{\"color\": [\"000000.png\", ...], ...}} "
                        f"(data/type_mapping.json)")
    unknown = sorted(set(data) - set(CHANGE_TYPES))
    if unknown:
        raise EvalError(f"{type_file}: unknown change types {unknown}; expected {CHANGE_TYPES}")
    return {str(image_id): change for change, ids in data.items() for image_id in ids}


def load_results(path):
    """A results file [{"image_id": ..., "caption": ...}, ...] -> {image_id: caption}."""
    data = _read_json(path, "results file")
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a JSON list of {{\"image_id\": \"000123.png\", "
                        f"\"caption\": \"...\"}}")
    results = {}
    for image_id, caption in _captions_of(data, path, "item"):
        if image_id in results:
            raise EvalError(f"{path}: image id {image_id} appears more than once")
        results[image_id] = caption
    return results


# --------------------------------------------------------------------------- tokenizer

def ptb_tokenize(sentences):
    """Stanford PTB tokenization as in pycocoevalcap: lower-case, punctuation tokens dropped.

    One Java call for the whole list; returns the tokenized sentences joined by spaces.
    """
    jar = os.path.join(_package_dir("tokenizer"), "stanford-corenlp-3.4.1.jar")
    # Empty lines would not come back as lines, so only non-empty sentences go to Java.
    lines = [s.replace("\n", " ").replace("\r", " ").strip() for s in sentences]
    todo = [i for i, line in enumerate(lines) if line]
    out = [""] * len(lines)
    if not todo:
        return out
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines[i] for i in todo))
        proc = subprocess.run([java_executable(), "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", path],
                              capture_output=True, cwd=tmp)
    if proc.returncode != 0:
        raise EvalError(f"the PTB tokenizer ({jar}) failed: "
                        f"{proc.stderr.decode(errors='replace')[-1000:]}")
    tokenized = proc.stdout.decode("utf-8").split("\n")
    if tokenized and tokenized[-1] == "":
        tokenized.pop()
    if len(tokenized) != len(todo):
        raise EvalError(f"the PTB tokenizer returned {len(tokenized)} lines for {len(todo)} "
                        f"captions")
    for i, line in zip(todo, tokenized):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCTUATION)
    return out


# --------------------------------------------------------------------------- METEOR and SPICE

class _Meteor:
    """One METEOR 1.5 process: alignment statistics per caption, then scores of any subset.

    The corpus METEOR of a subset comes from its captions' statistics alone, so statistics are
    computed once per caption and each subset is one cheap EVAL request.
    """

    def __init__(self):
        meteor_dir = _package_dir("meteor")
        self._proc = subprocess.Popen(
            [java_executable(), "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0)

    def _exchange(self, lines, replies):
        # A writer thread keeps both pipes moving (writing everything first could deadlock once
        # the reply pipe is full). The reader takes large blocks and naps in between: METEOR
        # flushes every reply line, and while the Python scorers run in the main thread, each
        # wake-up waits for the GIL; one wake-up per line made METEOR several times slower.
        payload = "".join(line + "\n" for line in lines).encode("utf-8")

        def write():
            try:
                self._proc.stdin.write(payload)
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass  # the process died; the reader below reports it

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        fd = self._proc.stdout.fileno()
        chunks, newlines = [], 0
        while newlines < replies:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EvalError("the METEOR process (pycocoevalcap/meteor/meteor-1.5.jar) "
                                "stopped unexpectedly; check that Java has 2 GB of memory")
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
            if newlines < replies:
                time.sleep(0.05)  # a pipe holds 64 KiB: about 600 replies
        writer.join()
        return b"".join(chunks).decode("utf-8").splitlines()[:replies]

    def stats(self, pairs):
        """[(hypothesis, [references])] -> one statistics line per pair."""
        lines = []
        for hyp, refs in pairs:
            hyp = hyp.replace("|||", "").replace("  ", " ")
            lines.append(" ||| ".join(("SCORE", " ||| ".join(refs), hyp)))
        return self._exchange(lines, len(lines))

    def score(self, stats):
        """Corpus METEOR of the captions with these statistics."""
        replies = self._exchange(["EVAL ||| " + " ||| ".join(stats)], len(stats) + 1)
        return float(replies[-1])

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()


def spice_jars():
    """The two Stanford CoreNLP 3.6.0 jars SPICE needs, in pycocoevalcap's spice/lib folder."""
    lib = os.path.join(_package_dir("spice"), "lib")
    return [os.path.join(lib, "stanford-corenlp-3.6.0.jar"),
            os.path.join(lib, "stanford-corenlp-3.6.0-models.jar")]


def spice_available():
    """True when SPICE can run offline; otherwise warns once (per process) how to enable it."""
    global _SPICE_WARNED
    missing = [jar for jar in spice_jars() if not os.path.isfile(jar)]
    if not missing:
        return True
    if not _SPICE_WARNED:
        _SPICE_WARNED = True
        warnings.warn(
            f"SPICE skipped (reported as None): it needs Stanford CoreNLP 3.6.0, and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. To enable "
            f"it, copy stanford-corenlp-3.6.0.jar and "
            f"stanford-corenlp-3.6.0-models.jar from stanford-corenlp-full-2015-12-09.zip "
            f"(nlp.stanford.edu) into {os.path.dirname(missing[0])}.", RuntimeWarning,
            stacklevel=3)
    return False


def _spice_per_caption(gts, res):
    """SPICE F-score of every key (the SPICE jar run once, its files in a temporary folder)."""
    spice_dir = _package_dir("spice")
    records = [{"image_id": str(i), "test": res[key][0], "refs": gts[key]}
               for i, key in enumerate(gts)]
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        in_path, out_path = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(in_path, "w") as handle:
            json.dump(records, handle)
        proc = subprocess.run([java_executable(), "-jar", "-Xmx8G", "spice-1.0.jar", in_path,
                               "-out", out_path, "-subset", "-silent"],
                              cwd=spice_dir, capture_output=True)
        if proc.returncode != 0:
            raise EvalError(f"SPICE failed: {proc.stderr.decode(errors='replace')[-1000:]}")
        with open(out_path) as handle:
            scores = {item["image_id"]: item["scores"]["All"]["f"] for item in json.load(handle)}
    values = {}
    for i, key in enumerate(gts):
        value = scores.get(str(i))
        values[key] = float(value) if value is not None else float("nan")
    return values


# --------------------------------------------------------------------------- scoring

def _metric_names(metrics):
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown:
        raise EvalError(f"unknown metrics {unknown}; choose from {SCORERS}")
    names = []
    for metric in metrics:
        names.extend(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"] if metric == "Bleu" else [metric])
    return names


class CaptionScorer:
    """Scores subsets of one set of generated captions against their references.

    ``hypotheses`` maps any hashable key to a generated caption, ``references`` maps the same
    keys to lists of reference captions. Everything is tokenized in one call at construction,
    and METEOR starts aligning every caption in the background right away (its Java process
    then runs beside the Python scorers). Use as a context manager, or call close().
    """

    def __init__(self, hypotheses, references, metrics=SCORERS):
        self.names = _metric_names(metrics)
        self.metrics = tuple(metrics)
        keys = list(hypotheses)
        missing = [k for k in keys if not references.get(k)]
        if missing:
            raise EvalError(f"{len(missing)} captions have no references, e.g. {missing[:3]}")
        # METEOR needs about 10 s to load its paraphrase table: start it first.
        self._meteor = _Meteor() if "METEOR" in self.metrics and keys else None
        # Reference sentences repeat a lot (templates, several result folders sharing one
        # ground truth): each distinct sentence is tokenized once.
        unique = {}
        for k in keys:
            unique.setdefault(hypotheses[k], None)
            for ref in references[k]:
                unique.setdefault(ref, None)
        try:
            unique = dict(zip(unique, ptb_tokenize(list(unique))))
        except BaseException:
            if self._meteor is not None:
                self._meteor.close()
            raise
        self.res = {k: [unique[hypotheses[k]]] for k in keys}
        self.gts = {k: [unique[ref] for ref in references[k]] for k in keys}
        # Captions of different snapshots are often identical: per-caption work is done once
        # per distinct (caption, references) pair.
        self._pair_of = {k: (self.res[k][0], tuple(self.gts[k])) for k in keys}
        self._pairs = list(dict.fromkeys(self._pair_of.values()))
        self._use_spice = "SPICE" in self.metrics and spice_available()
        self._cooked = None
        if self._meteor is not None:
            self._meteor_stats = None
            self._meteor_error = None
            self._meteor_thread = threading.Thread(target=self._align, daemon=True)
            self._meteor_thread.start()

    def _align(self):
        try:
            stats = self._meteor.stats([(h, list(r)) for h, r in self._pairs])
            self._meteor_stats = dict(zip(self._pairs, stats))
        except Exception as err:  # handed to the main thread in score_subsets
            self._meteor_error = err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._meteor is not None:
            self._meteor.close()
            self._meteor_thread.join()
            self._meteor = None

    def _cook(self):
        """Per-pair scorer state (BLEU and CIDEr n-gram counts, ROUGE-L, SPICE), built once."""
        if self._cooked is not None:
            return self._cooked
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider_scorer import CiderScorer
        from pycocoevalcap.cider.cider_scorer import precook as cider_precook
        from pycocoevalcap.rouge.rouge import Rouge

        cooked = {}
        if "Bleu" in self.metrics:
            cooked["Bleu"] = {p: BleuScorer(p[0], list(p[1]), n=4) for p in self._pairs}
        if "CIDEr" in self.metrics:
            # What CiderScorer(hyp, refs) holds, with each distinct sentence's n-gram counts
            # computed once (n=4 as in pycocoevalcap's Cider wrapper).
            counts = {}

            def ngrams(sentence):
                if sentence not in counts:
                    counts[sentence] = cider_precook(sentence, 4)
                return counts[sentence]

            cooked["CIDEr"] = {}
            for p in self._pairs:
                one = CiderScorer(n=4, sigma=6.0)
                one.ctest.append(ngrams(p[0]))
                one.crefs.append([ngrams(ref) for ref in p[1]])
                cooked["CIDEr"][p] = one
        if "ROUGE_L" in self.metrics:
            rouge = Rouge()
            cooked["ROUGE_L"] = {p: rouge.calc_score([p[0]], list(p[1])) for p in self._pairs}
        if self._use_spice:
            cooked["SPICE"] = _spice_per_caption({p: list(p[1]) for p in self._pairs},
                                                 {p: [p[0]] for p in self._pairs})
        self._cooked = cooked
        return cooked

    def _meteor_scores(self, subsets, into):
        """Corpus METEOR of each non-empty subset into ``into`` (runs in a background thread)."""
        try:
            self._meteor_thread.join()
            if self._meteor_error is None:
                for name, pairs in subsets.items():
                    if pairs:
                        into[name] = self._meteor.score([self._meteor_stats[p] for p in pairs])
        except Exception as err:  # handed to the main thread in score_subsets
            self._meteor_error = err

    def score_subsets(self, subsets):
        """{name: keys} -> {name: {metric name: value}}; values are None for an empty subset."""
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        pairs_of = {name: [self._pair_of[k] for k in keys] for name, keys in subsets.items()}
        if "METEOR" in self.metrics:
            # The Java side works while the Python scorers below run.
            meteor = {}
            meteor_thread = threading.Thread(target=self._meteor_scores, args=(pairs_of, meteor),
                                             daemon=True)
            meteor_thread.start()
        cooked = self._cook()
        out = {}
        for name, pairs in pairs_of.items():
            if not pairs:
                out[name] = {metric: None for metric in self.names}
                continue
            row = {}
            if "Bleu" in self.metrics:
                # What pycocoevalcap's Bleu.compute_score does, from the precooked counts.
                bleu = BleuScorer(n=4)
                for p in pairs:
                    bleu += cooked["Bleu"][p]
                values, _ = bleu.compute_score(option="closest", verbose=0)
                row.update({f"Bleu_{n + 1}": float(v) for n, v in enumerate(values)})
            if "ROUGE_L" in self.metrics:
                row["ROUGE_L"] = float(np.mean([cooked["ROUGE_L"][p] for p in pairs]))
            if "CIDEr" in self.metrics:
                # Likewise Cider.compute_score; the IDF comes from this subset's references.
                cider = CiderScorer(n=4, sigma=6.0)
                for p in pairs:
                    cider += cooked["CIDEr"][p]
                row["CIDEr"] = float(cider.compute_score()[0])
            if "SPICE" in self.metrics:
                row["SPICE"] = (float(np.mean([cooked["SPICE"][p] for p in pairs]))
                                if self._use_spice else None)
            out[name] = row
        if "METEOR" in self.metrics:
            meteor_thread.join()
            if self._meteor_error is not None:
                raise self._meteor_error
            for name, value in meteor.items():
                out[name]["METEOR"] = value
        return {name: {metric: row[metric] for metric in self.names} for name, row in out.items()}

    def score(self, keys=None):
        """{metric name: value} over ``keys`` (all captions when None); None for no captions."""
        return self.score_subsets({"all": list(self.res) if keys is None else list(keys)})["all"]


def score_captions(results, references, metrics=SCORERS):
    """Score generated captions against COCO references.

    ``results``: [{"image_id": "000123.png", "caption": "..."}]; ``references``: as returned by
    load_references. Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"} for the
    requested scorers (SPICE is None when it cannot run offline). metrics=("Bleu", "CIDEr")
    starts no Java process besides the tokenizer.
    """
    hypotheses = {}
    for item in results:
        image_id = str(item["image_id"])
        if image_id not in references:
            raise EvalError(f"generated caption for image id {image_id}, which has no reference "
                            f"captions; check that results and annotation file match")
        hypotheses[image_id] = item["caption"]
    if not hypotheses:
        raise EvalError("no generated captions to score")
    with CaptionScorer(hypotheses, references, metrics) as scorer:
        return scorer.score()


# --------------------------------------------------------------------------- change detection

_COLORS = set(COLORS)
_MATERIALS = {word for words in MATERIAL_WORDS.values() for word in words}
# Verbs of a colour or material change; the new value follows them ("turned blue", "was made shiny").
CHANGE_VERBS = {"turned", "became", "changed", "made", "modified"}
_DROP_WORDS = {"missing", "gone", "disappeared", "removed"}
_ADD_WORDS = {"added", "appeared", "newly", "placed"}
_MOVE_WORDS = {"moved", "location", "position"}
_SAME_WORDS = {"nothing", "identical", "same"}
_WORD = re.compile(r"[a-z]+")


def classify_caption(text):
    """Which change a caption describes: one of CAPTION_CLASSES, or None when no rule matches.

    Keyword rules on the CLEVR-Change vocabulary. The object description before the change verb
    can name a colour or material too ("the small matte object became brown"), so for colour and
    material changes only the words after the verb count.
    """
    words = _WORD.findall(text.lower())
    vocab = set(words)
    bigrams = set(zip(words, words[1:]))
    if vocab & _MOVE_WORDS:
        return "move"
    if vocab & _DROP_WORDS or ("no", "longer") in bigrams:
        return "drop"
    if vocab & _ADD_WORDS:
        return "add"
    verbs = [i for i, w in enumerate(words) if w in CHANGE_VERBS]
    if verbs:
        after = set(words[verbs[0] + 1:])
        if after & _MATERIALS:
            return "material"
        if after & _COLORS:
            return "color"
    if vocab & _SAME_WORDS or ("no", "change") in bigrams or ("no", "difference") in bigrams:
        return "no_change"
    return None


def change_detection(sc_results, nsc_results, image_types):
    """Change-detection figures read off the generated captions.

    sc_results / nsc_results: {image id: caption} of changed and distractor pairs;
    image_types: {"000123.png": change type}. Returns counts and shares (None when empty).
    """
    def share(hits, total):
        return hits / total if total else None

    nsc_hits = sum(classify_caption(c) == "no_change" for c in nsc_results.values())
    detected = 0
    per_type = {t: [0, 0] for t in CHANGE_TYPES}  # type -> [right type, pairs]
    for image_id, caption in sc_results.items():
        label = classify_caption(caption)
        detected += label not in ("no_change", None)
        counts = per_type[image_types[image_id]]
        counts[0] += label == image_types[image_id]
        counts[1] += 1
    right = sum(c[0] for c in per_type.values())
    return {
        "distractor_no_change": share(nsc_hits, len(nsc_results)),
        "distractor_pairs": len(nsc_results),
        "change_detected": share(detected, len(sc_results)),
        "change_type_correct": share(right, len(sc_results)),
        "changed_pairs": len(sc_results),
        "per_type_correct": {t: share(c[0], c[1]) for t, c in per_type.items()},
    }
