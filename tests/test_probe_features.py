"""research/probe_features.py: the linear probe docs/data.md chooses the demo's features with."""
import os
import shutil

import pytest
import torch

from research import probe_features
from tests.helpers import assert_cli_error, run_cli, tiny_cfg, write_cfg


def _object(box, **attributes):
    values = {"shape": "cube", "color": "red", "material": "metal", "size": "large", **attributes}
    return {"boxes": {"default": box}, **values}


def test_each_object_falls_in_the_cell_under_its_box_centre():
    scenes = [{"objects": [_object([0, 0, 10, 10]),  # centre (5, 5) of a 100 x 50 image: cell (0, 0) of 5 x 4
                           _object([90, 40, 100, 50], color="blue"),  # centre (95, 45): the last cell
                           _object(None)]},  # added later: not in the "before" image
              {"objects": [_object([40, 20, 60, 30], shape="sphere")]}]  # centre (50, 25): row 2, column 2
    cells = probe_features.object_cells(scenes, image_size=(100, 50), grid=(4, 5))
    assert [(s, r, c) for s, r, c, _ in cells] == [(0, 0, 0), (0, 3, 4), (1, 2, 2)]
    assert [found["color"] for *_, found in cells] == ["red", "blue", "red"]
    assert cells[2][3]["shape"] == "sphere"


def test_the_probe_reads_a_separable_attribute_and_not_a_random_one():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=generator)
    train = torch.arange(400) < 320
    separable = ["a" if value > 0 else "b" for value in x[:, 2]]
    accuracy, majority = probe_features.fit_and_score(x, separable, train)
    assert accuracy > 0.95 and majority < 0.7
    unrelated = ["a" if value > 0 else "b" for value in torch.randn(400, generator=generator)]
    accuracy, _ = probe_features.fit_and_score(x, unrelated, train)
    assert accuracy < 0.7


def test_the_command_on_stored_features_and_without_a_scenes_file(tiny_data, tmp_path):
    config = write_cfg(tiny_cfg(tiny_data), tmp_path)
    proc = run_cli("research/probe_features.py", "--cfg", config, "--scenes", "40", "--features", tiny_data["features"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training /" in proc.stdout
    for attribute in probe_features.ATTRIBUTES:
        assert f"  {attribute}" in proc.stdout

    bare = tmp_path / "bare"  # the annotations without the scenes.json beside them (as the real data)
    bare.mkdir()
    shutil.copy(tiny_data["anno"], bare / os.path.basename(tiny_data["anno"]))
    config = write_cfg(tiny_cfg({**tiny_data, "anno": str(bare / os.path.basename(tiny_data["anno"]))}), tmp_path, "bare.yaml")
    assert_cli_error(run_cli("research/probe_features.py", "--cfg", config), "scenes.json", "data.anno_json")

    empty = tmp_path / "no_features"
    empty.mkdir()
    config = write_cfg(tiny_cfg(tiny_data), tmp_path, "again.yaml")
    assert_cli_error(run_cli("research/probe_features.py", "--cfg", config, "--features", empty), "--features",
                     "lacks 40")
