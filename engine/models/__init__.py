"""Models through open_clip: architecture names, pretrained tags, local checkpoint files, Hugging Face
CLIP directories (hf.py), and the training forward (towers.py).

The engine's own small configs are registered with open_clip's
registry on first use, so `open_clip.create_model_and_transforms("tiny-clip", pretrained=PATH)`
works in any process that called `register_configs()`:
- `tiny-clip`: ResNet image tower, transformer text tower, 32 px. Learns the embedded default
  in a minute on two CPU cores (a ViT this small needs several times longer); demo and tests.
- `tiny-vit`: the same with a ViT image tower (patch 4), for tests of ViT code paths.
- `small-clip`: a ViT at 64 px, a step up for GPU smoke runs.
"""
from .loading import check_model_spec, load_model
from .registry import CONFIG_DIR, LoadedModel, available_models, checkpoint_file_problems, register_configs
from .towers import Towers, train_mode

__all__ = ["LoadedModel", "CONFIG_DIR", "register_configs", "available_models", "check_model_spec",
           "checkpoint_file_problems", "load_model", "Towers", "train_mode"]
