# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Image change captioning with SCORER + CBR: the assignment in a browser
#
# This notebook takes you through the whole assignment on Google Colab (or in any Jupyter): set-up, data, your
# six snippets, training, testing, evaluation, figures, the report and the hand-in zip. Each step is a short
# explanation and one cell; run them from the top, in order.
#
# Colab ends sessions after some hours or when idle, and wipes the machine's disk. What must survive lives on
# your Google Drive: the handout with your code, the packed features, the experiment. After a disconnect, run
# the notebook again from the top: finished steps are skipped, and an interrupted pack or training goes on
# where it stopped.
#
# On Colab pick a GPU before you start: **Runtime > Change runtime type > T4 GPU**.

# %% [markdown]
# ## Parameters
#
# The block at the top is the course's: the handout and the two archives of CLEVR-Change. The rest is yours.
# `DATA = "synthetic"` renders a CLEVR-like data set on the spot (the one `make demo` trains on) to try the
# notebook without the real data; set `CFG = "configs/dynamic/transformer_demo.yaml"` with it.

# %% tags=["parameters"]
# ===== For the course to fill in =====
HANDOUT = ""  # the handout: a git URL, or the path of assignment.tar.gz on Google Drive
IMAGES_ARCHIVE = ""  # clevr_change.tar.gz (images, captions, splits): a download URL, or its path on Drive
FEATURES_ARCHIVE = ""  # clevr_change_features.tar.gz (ResNet features): a download URL, or its path on Drive
# ===== Yours =====
DATA = "clevr_change"  # "clevr_change" (the real data; needs a GPU) or "synthetic" (a generated stand-in)
CFG = "configs/dynamic/transformer_quick.yaml"  # the assignment's quick run
WORK_DIR = "/content/drive/MyDrive/scorer_cbr"  # on Colab: your folder on Drive (handout, features, experiment)
LOCAL_DIR = "/content/local"  # the machine's own disk: downloads, images, copies read often (wiped at a disconnect)
SYNTHETIC_SCENES = 2000  # scenes of the synthetic data set
EXTRA = []  # KEY VALUE config overrides for every step, e.g. ["train.max_iter", "1000"]
REFRESH_SECONDS = 30  # how often the training cell redraws its curves and last lines

# %% [markdown]
# ## 1. Set-up: the handout
#
# On Colab the handout lives on your Drive, in `WORK_DIR/assignment`, so that your snippets survive a
# disconnect. The first run mounts Drive (allow the access it asks for) and fetches the handout from
# `HANDOUT`; later runs find it there. Open and edit the four files from the Files pane on the left
# (`drive/MyDrive/scorer_cbr/assignment/...`). Outside Colab the notebook uses the repository it sits in.

# %%
import os
import subprocess
import sys

if "google.colab" in sys.modules:
    if WORK_DIR.startswith("/content/drive/"):
        from google.colab import drive

        try:
            drive.mount("/content/drive")
        except Exception as err:  # declined, or timed out
            raise SystemExit(f"Google Drive did not mount ({err}): run this cell again and allow the access, or set "
                             f"WORK_DIR in the first code cell to a folder under /content (lost at a disconnect)")
    REPO = os.path.join(WORK_DIR, "assignment")
    if not os.path.isfile(os.path.join(REPO, "train.py")):
        if not HANDOUT:
            raise SystemExit("HANDOUT is empty: the course puts the handout's git URL or the path of its "
                             "assignment.tar.gz in the first code cell (For the course to fill in)")
        partial = REPO + ".partial"  # renamed once complete: an interrupted fetch leaves no half handout
        subprocess.run(["rm", "-rf", partial], check=True)
        if HANDOUT.endswith((".tar.gz", ".tgz", ".tar")):
            os.makedirs(partial)
            fetch = ["tar", "-xf", HANDOUT, "-C", partial, "--strip-components=1"]
        else:
            fetch = ["git", "clone", "--depth", "1", HANDOUT, partial]
        if subprocess.run(fetch).returncode or not os.path.isfile(os.path.join(partial, "train.py")):
            raise SystemExit(f"{HANDOUT} did not give the handout (a folder with train.py); check HANDOUT")
        os.rename(partial, REPO)
else:
    REPO = os.getcwd()
    while not os.path.isfile(os.path.join(REPO, "utils", "notebook.py")):
        if os.path.dirname(REPO) == REPO:
            raise SystemExit("start Jupyter in the repository (or its notebooks/ folder): no utils/notebook.py above "
                             + os.getcwd())
        REPO = os.path.dirname(REPO)
os.chdir(REPO)
print(f"the handout: {REPO}")

# %% [markdown]
# ## 2. Set-up: install
#
# On Colab this installs the requirements (torch is already there) and Java, which the caption metrics need:
# a minute or two, in every new session. Elsewhere it checks that this Python has them (`make setup` installs
# them into `.venv`).

# %%
from utils import notebook as nb

nb.install()

# %% [markdown]
# ## 3. Set-up: the GPU
#
# Which GPU torch can use, and if none, why not. A T4 (compute capability 7.5, Colab's) trains in fp16 with
# loss scaling; a GPU of compute capability 8 or more (A100, RTX 30xx) in bf16. On Colab without a GPU the
# real data stops here: Runtime > Change runtime type > T4 GPU.

# %%
GPU = nb.gpu_check(DATA)

# %% [markdown]
# ## 4. Data: images and captions
#
# The captions, splits and change types of `clevr_change.tar.gz` go to the config's data folder (`data/`, on
# Drive), where the vocabulary and the label file are built from them once. The images (about 120,000 small
# files, too many for Drive) are unpacked onto the machine's disk only when a step needs them: here the first
# time, and for the figures. With `DATA = "synthetic"` this step renders the scenes and extracts their
# features instead, as `make demo` does.

# %%
cfg = nb.load_config(CFG, EXTRA)
if DATA == "synthetic":
    nb.make_synthetic(CFG, cfg, SYNTHETIC_SCENES)
else:
    nb.prepare_captions(cfg, IMAGES_ARCHIVE, LOCAL_DIR)

# %% [markdown]
# ## 5. Data: the feature store
#
# The quick run uses 14,473 of the 39,803 scenes, and the features archive holds all of them (96 GB once
# unpacked). `scripts/pack_features.py` reads the archive as a stream and writes just the features the
# config uses, in float16, into one file: the feature store (README, section 3). The whole store is 17.5 GB,
# and a free Google Drive holds 15 GB, so this step first looks at the free space on Drive:
#
# - room for all of it beside the experiment: all three splits go into `data/clevr_change_quick.h5`;
# - room for the training and validation scenes (12.6 GB): those go to Drive now, and the test split
#   (3,985 scenes, 4.8 GB) is packed onto the machine's disk when testing (step 8), again after a disconnect;
# - less: it stops and says how to make room.
#
# Packing reads the whole archive once, front to back, and shows its progress. Interrupted (a disconnect,
# the Stop button), it goes on where it stopped when you run the cell again, and only a store it has checked
# image by image gets its final name. Training reads the store many times over, at random places, which Drive
# does slowly, so a store on Drive is copied to the machine's disk once per session.

# %%
STORE = nb.feature_store(CFG, cfg, EXTRA, DATA, FEATURES_ARCHIVE, LOCAL_DIR)

# %% [markdown]
# ## 6. The six snippets
#
# Write them in their `== To Implement ==` blocks (README, section 4): on Colab open
# `models/CBR.py`, `models/transformer_decoder.py`, `models/SCORER.py` and `utils/utils.py` from the Files
# pane. This cell runs `make snippets` (`python -m pytest -q tests/test_snippets.py`): each snippet on
# recorded inputs against the solution's outputs. Until all six match, the notebook stops here and says which
# are left.

# %%
nb.check_snippets()

# %% [markdown]
# ## 7. Training
#
# `train.py` on the quick config (3,000 iterations, a snapshot and a validation every 500), in half precision
# on a GPU, writing to the experiment folder `experiments/SCORER+CBR_quick` on Drive. On Colab the visdom
# dashboard appears below (losses, learning rate, validation scores and captions); elsewhere, or when it
# cannot be shown, the cell draws the losses and validation scores of `metrics.jsonl` and refreshes them
# every `REFRESH_SECONDS`. After a disconnect, run the notebook again: this cell adds `--resume` and training
# goes on from the last snapshot. The Stop button makes training save a snapshot first.

# %%
nb.train(CFG, cfg, EXTRA, GPU, STORE, LOCAL_DIR, REFRESH_SECONDS)

# %% [markdown]
# ## 8. Test
#
# The test split captioned with the best snapshot (the highest validation CIDEr), into
# `test_output/captions/test/` of the experiment. A test split that did not fit on Drive is packed onto the
# machine's disk first.

# %%
TEST_STORE = nb.test_store(CFG, cfg, EXTRA, DATA, FEATURES_ARCHIVE, LOCAL_DIR, STORE)
READ_TEST = EXTRA + nb.store_overrides(cfg, TEST_STORE)
nb.check(["python", "test.py", "--cfg", CFG, "--snapshot", "best", "--gpu", GPU.id, *READ_TEST], "test.py")

# %% [markdown]
# ## 9. Evaluate
#
# BLEU, METEOR, ROUGE-L and CIDEr of every snapshot's validation captions (which names the best snapshot), then
# of the test captions; the tables land in `eval_results.txt` next to the captions. `docs/evaluation.md`
# explains the figures.

# %%
EXP = nb.experiment(cfg)
for RESULTS in (EXP.val_captions, EXP.test_captions):
    nb.check(["python", "evaluate.py", "--results_dir", RESULTS, "--anno", cfg.data.anno_json,
              "--type_file", cfg.data.type_mapping_json], "evaluate.py")

# %% [markdown]
# ## 10. Figures
#
# One (before, changed, distractor) triplet of each change type from the test split, with both generated
# captions, the references and the attention maps, into `figures/` of the experiment.

# %%
IMAGES = nb.ensure_images(cfg, IMAGES_ARCHIVE, LOCAL_DIR) if DATA == "clevr_change" else []
nb.check(["python", "scripts/visualize.py", "--cfg", CFG, "--snapshot", "best", "--per_type", "1", "--attention",
          "--gpu", GPU.id, *READ_TEST, *IMAGES], "scripts/visualize.py")

# %% [markdown]
# ## 11. The report
#
# Scores, training curves and the figures in one file, `report/report.html` of the experiment (and
# `report.md`).

# %%
nb.check(["python", "scripts/make_report.py", "--cfg", CFG, *READ_TEST, *IMAGES], "scripts/make_report.py")

# %% [markdown]
# ## 12. The hand-in
#
# `make submission` checks the four files, the six snippets and the report, and writes `submission.zip`
# (the four files and `report.html`, as the grader reads them). This cell runs the script behind it, with the
# zip in the experiment folder (on Drive), and on Colab downloads it: that zip is what you hand in.

# %%
nb.check(["python", "scripts/make_submission.py", "--cfg", CFG, "--output", f"{EXP.root}/submission.zip", *EXTRA],
         "make submission")
nb.download_to_laptop(f"{EXP.root}/submission.zip")
