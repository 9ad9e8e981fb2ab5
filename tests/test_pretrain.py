"""launch/pretrain.py: from shards to an open_clip-loadable checkpoint."""
import json

import open_clip
import torch

from cliperase.engine.models import register_configs
from helpers import tiny_data  # noqa: F401
from launch import pretrain as cli


def test_pretrain_writes_loadable_checkpoint_and_learns(tiny_data, tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    args = ["--model", "tiny-clip", "--train-data", str(tiny_data / "train"), "--steps", "6", "--batch-size", "16",
            "--lr", "1e-3", "--seed", "1", "--output", str(out), "--no-progress"]
    assert cli.main(args) == 0
    register_configs()
    model = open_clip.create_model("tiny-clip", pretrained=str(out))
    meta = json.loads((tmp_path / "tiny.pt.json").read_text())
    assert meta["model"] == "tiny-clip" and meta["pretrain"]["steps"] == 6
    # Same seed, same data order, same weights: pretraining is reproducible.
    out2 = tmp_path / "again.pt"
    assert cli.main(args[:-2] + [str(out2), "--no-progress"]) == 0
    again = open_clip.create_model("tiny-clip", pretrained=str(out2))
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert "saved" in capsys.readouterr().out


def test_pretrain_refuses_missing_data(tmp_path, capsys):
    assert cli.main(["--train-data", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.pt")]) == 2
    assert "train_data" in capsys.readouterr().err
