"""Model loading through open_clip: names, tags, local checkpoints, and clear errors."""
import open_clip
import pytest
import torch

from cliperase.engine import ConfigError
from cliperase.engine.models import check_model_spec, load_model, register_configs
from helpers import tiny_checkpoint  # noqa: F401


def test_engine_configs_are_registered_with_open_clip():
    register_configs()
    assert {"tiny-clip", "small-clip"} <= set(open_clip.list_models())


def test_checkpoint_round_trips_through_open_clip(tiny_checkpoint):
    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(tiny_checkpoint))
    ours = load_model("tiny-clip", str(tiny_checkpoint)).model
    for (k, a), (_, b) in zip(model.state_dict().items(), ours.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert preprocess.transforms[0].size == 32


def test_unknown_model_lists_close_matches():
    with pytest.raises(ConfigError, match=r"unknown architecture 'ViT-L-41'.*Did you mean.*ViT-L-14"):
        load_model("ViT-L-41")


def test_unknown_tag_lists_available_tags():
    problems = check_model_spec("ViT-B-32", "not_a_tag")
    assert len(problems) == 1 and "laion2b_s34b_b79k" in problems[0]


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint file .*missing.pt.* does not exist"):
        load_model("tiny-clip", str(tmp_path / "missing.pt"))


def test_checkpoint_of_another_architecture_is_refused(tiny_checkpoint):
    with pytest.raises(ConfigError, match="is not a checkpoint of small-clip"):
        load_model("small-clip", str(tiny_checkpoint))


def test_known_tag_without_network_fails_fast(monkeypatch, tmp_path):
    """No network here: the tag's weights cannot be fetched; the error says so and what to do."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache, whatever this machine holds
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="could not load tag 'openai' of RN50.*pass the file path"):
        load_model("RN50", "openai")
    assert time.perf_counter() - t0 < 30


def test_the_tag_table_read_from_open_clips_source_is_open_clips_own():
    """preflight reads pretrained tags from open_clip's pretrained.py without running it (running
    it imports torch); an open_clip upgrade that changes the file's layout must fail here."""
    import open_clip

    from cliperase.engine.models import specs

    table = specs._pretrained_table()
    assert table is not None, "open_clip's pretrained.py is laid out in a way the reader does not know"
    assert sorted((m, t) for m, tags in table.items() for t in tags) == sorted(open_clip.list_pretrained())
    assert specs.pretrained_tags("ViT-B-32") == open_clip.list_pretrained_tags_by_model("ViT-B-32")


def test_checkpoint_shapes_are_read_without_torch_and_match_torch(tiny_checkpoint):
    import torch

    from cliperase.engine.models import specs

    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert specs.checkpoint_shapes(str(tiny_checkpoint)) == {k: tuple(v.shape) for k, v in state.items()}
    assert specs.architecture_problems("tiny-clip", str(tiny_checkpoint)) == []
    wrong = specs.architecture_problems("ViT-B-32", str(tiny_checkpoint))
    assert len(wrong) == 1 and "is not a checkpoint of ViT-B-32" in wrong[0] and "pass --model tiny-clip" in wrong[0]
