"""Shared fixtures: small generated datasets and checkpoints, made once per test session."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cliperase.engine.tools.synthetic import write_default


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small embedded-default dataset: forget = circles."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    write_default(root, forget=lambda s: s.shape == "circle", n_train=240, n_eval=72, seed=3)
    return root


def random_checkpoint(tmp_path_factory, model: str, filename: str) -> Path:
    """A randomly initialised (seed 0) engine model saved as an open_clip checkpoint."""
    import torch

    from cliperase.engine.checkpoint import export_open_clip
    from cliperase.engine.models import load_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / filename
    export_open_clip(load_model(model).model, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny-clip saved as an open_clip checkpoint."""
    return random_checkpoint(tmp_path_factory, "tiny-clip", "tiny.pt")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_args(data: Path, out: Path, **extra) -> list:
    args = ["--model", "tiny-clip", "--forget-data", str(data / "forget"), "--retain-data", str(data / "retain"),
            "--eval-data", str(data / "eval"), "--forget-classes", "circle", "--steps", "3", "--batch-size", "8",
            "--lr", "1e-4", "--output-dir", str(out), "--no-progress"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args
