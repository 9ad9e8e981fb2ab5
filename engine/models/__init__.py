"""Models through open_clip: architecture names, pretrained tags, local checkpoint files, Hugging Face
CLIP directories (hf.py), and the training forward (towers.py); specs.py checks a spec
without importing torch or open_clip.

The engine's own small configs are registered with open_clip's
registry on first use, so `open_clip.create_model_and_transforms("tiny-clip", pretrained=PATH)`
works in any process that called `register_configs()`:
- `tiny-clip`: ResNet image tower, transformer text tower, 32 px. Learns the embedded default
  in a minute on two CPU cores (a ViT this small needs several times longer); demo and tests.
- `tiny-vit`: the same with a ViT image tower (patch 4), for tests of ViT code paths.
- `small-clip`: a ViT at 64 px, a step up for GPU smoke runs.
"""
from ..lazy import lazy_exports

__all__ = ["LoadedModel", "CONFIG_DIR", "register_configs", "available_models", "model_names", "check_model_spec",
           "checkpoint_file_problems", "load_model", "load_empty", "Towers", "train_mode"]

_EXPORTS = {"LoadedModel": "registry", "CONFIG_DIR": "registry", "register_configs": "registry",
            "available_models": "registry", "model_names": "specs", "check_model_spec": "check",
            "checkpoint_file_problems": "specs", "load_model": "loading", "load_empty": "loading", "Towers": "towers", "train_mode": "towers"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
