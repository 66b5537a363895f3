"""configs/defaults.py: YAML and KEY VALUE merging, rejection of unknown keys and wrong types."""
import pytest

from configs.defaults import ConfigError, load_config


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.max_iters'"):
        load_config(None, ["train.max_iters", "5"])
    with pytest.raises(ConfigError, match="train.max_iter must be of type int"):
        load_config(None, ["train.max_iter", "many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  speaker:\n    heads: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.speaker.heads'"):
        load_config(str(bad))
    bad.write_text("train:\n  lambda_v: [1, 2]\n")
    with pytest.raises(ConfigError, match="train.lambda_v must be of type float"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  optim:\n    lr: 2e-4\n  grad_clip: 5\n")
    cfg = load_config(str(good), ["train.lambda_m", "0.01"])
    assert cfg.train.optim.lr == 2e-4 and cfg.train.grad_clip == 5.0 and cfg.train.lambda_m == 0.01
    assert cfg.is_frozen()


def test_every_default_key_has_a_comment():
    with open("configs/defaults.py") as handle:
        for line in handle:
            if line.startswith("_C.") and "= CN()" not in line:
                assert "#" in line, f"no comment on: {line.strip()}"
