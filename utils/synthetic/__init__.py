"""The synthetic CLEVR-Change generator (command: scripts/generate_synthetic_clevr.py).

Imports run one way, top to bottom: render.py (the ray caster), captions.py (templates and
referring expressions), scenes.py (sampling and rendering one triplet with its captions),
writing.py (the images in worker processes, the index files, a preview sheet).
"""
