"""Subgroup forgetting's pieces on constructed cases with known answers, and whole runs."""
import json

import pytest
import torch
from torch import nn

from cliperase.engine.models import load_model
from cliperase.engine.methods.subgroup import Ema, fisher_scores, layer_groups, search_soup, soup, top_layers, trainable_only
from helpers import run_args, tiny_checkpoint, tiny_data  # noqa: F401


class TwoPaths(nn.Module):
    """`forget_only` sees input dims 0-1, which only the forget set uses; `shared` sees 2-3."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.forget_only = nn.Linear(2, 3, bias=False)
        self.shared = nn.Linear(2, 3, bias=False)
        for m in (self.forget_only, self.shared):
            m.weight.data = torch.randn(3, 2, generator=g)

    def forward(self, x):
        return self.forget_only(x[:, :2]) + self.shared(x[:, 2:])


def _objective(model, batch):
    return model(batch).sum()


def test_fisher_ranks_the_forget_only_layer_above_the_shared_one():
    g = torch.Generator().manual_seed(1)
    forget = [torch.randn(5, 4, generator=g) for _ in range(3)]
    retain = [torch.cat([torch.zeros(5, 2), torch.randn(5, 2, generator=g)], dim=1) for _ in range(3)]
    model = TwoPaths()
    scores = fisher_scores(model, _objective, forget, retain)
    assert set(scores) == {"forget_only", "shared"}
    assert top_layers(scores, 1) == ["forget_only"]
    assert scores["forget_only"] > 1e6 * scores["shared"]
    assert all(p.grad is None for p in model.parameters()), "grads are left cleared"
    # The shared layer's score is the plain ratio of summed squared gradients.
    def sq(batches):
        total = 0.0
        for b in batches:
            model.zero_grad()
            _objective(model, b).backward()
            total += float(model.shared.weight.grad.pow(2).sum())
        return total
    assert scores["shared"] == pytest.approx(sq(forget) / sq(retain), rel=1e-5)


@pytest.mark.parametrize("name, expect", [
    ("tiny-vit", ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1", "transformer.resblocks.1"]),
    ("tiny-clip", ["visual.layer1.0", "visual.layer4.0", "transformer.resblocks.0", "token_embedding"]),
])
def test_layer_groups_of_open_clip_models(name, expect):
    model = load_model(name).model
    groups = layer_groups(model)
    assert set(expect) <= set(groups)
    names = [n for names in groups.values() for n in names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()), "each parameter in exactly one layer"


def test_trainable_only_freezes_the_rest():
    model = TwoPaths()
    assert trainable_only(model, ["shared"]) == 6
    assert model.shared.weight.requires_grad and not model.forget_only.weight.requires_grad
    with pytest.raises(ValueError, match="not layers of the model"):
        trainable_only(model, ["visual.layer9"])


def test_ema_closed_form():
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    ema = Ema(model, decay=0.5)
    for w in (1.0, 1.0, 1.0):
        model.weight.data.fill_(w)
        ema.update(model)
    assert ema.state["weight"].item() == pytest.approx(1 - 0.5 ** 3)
    ema.copy_to(model)
    assert model.weight.item() == pytest.approx(0.875)


def test_soup_interpolates_floats_only():
    o = {"w": torch.zeros(2), "n": torch.tensor([3])}
    u = {"w": torch.ones(2), "n": torch.tensor([5])}
    assert soup(o, u, 0.25)["w"].tolist() == [0.25, 0.25]
    assert soup(o, u, 0.25)["n"].tolist() == [5]
    with pytest.raises(ValueError, match="differ in keys"):
        soup(o, {"w": torch.ones(2)}, 0.5)


def _fake_eval(retain_drop):
    """forget acc falls with a; retain acc falls by retain_drop(a) (w is the soup weight itself)."""
    def evaluate(state):
        a = float(state["w"][0])
        return 1.0 - a, 0.9 - retain_drop(a)
    return evaluate


def test_search_soup_returns_the_original_when_nothing_keeps_retain():
    o, u = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    a, info = search_soup(o, u, _fake_eval(lambda a: 0.1 if a > 0 else 0.0), tolerance=0.02)
    assert a == 0.0
    assert info["original"] == (1.0, 0.9) and len(info["tried"]) == 10


def test_search_soup_picks_strongest_forgetting_within_tolerance():
    o, u = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    a, info = search_soup(o, u, _fake_eval(lambda a: 0.0 if a < 0.65 else 0.05), tolerance=0.02)
    assert a == pytest.approx(0.6)
    assert info["tried"][0.6][0] == pytest.approx(0.4)


def test_fisher_reduce_sees_the_sums_before_the_ratio():
    g = torch.Generator().manual_seed(2)
    forget = [torch.randn(5, 4, generator=g)]
    retain = [torch.randn(5, 4, generator=g)]
    model = TwoPaths()
    plain = fisher_scores(model, _objective, forget, retain)
    seen = []

    def reduce(sums):  # what an all-reduce over 2 ranks holding the same data would give
        seen.append(sums.shape)
        return sums * 2
    assert fisher_scores(model, _objective, forget, retain, reduce=reduce) == pytest.approx(plain, rel=1e-9)
    assert seen == [torch.Size([2, 2])]
    halve_retain = fisher_scores(model, _objective, forget, retain, reduce=lambda s: s * torch.tensor([[1.0], [0.5]], dtype=s.dtype))
    assert halve_retain == pytest.approx({k: 2 * v for k, v in plain.items()}, rel=1e-6)


def test_ema_of_named_entries_in_fp32_and_resumed_from_state():
    model = nn.Linear(2, 1).to(torch.bfloat16)
    ema = Ema(model, decay=0.5, names=["weight"])
    assert set(ema.state) == {"weight"} and ema.state["weight"].dtype == torch.float32
    start = ema.state["weight"].clone()
    again = Ema.from_state(ema.state, 0.5)  # e.g. from a checkpoint's method state
    model.weight.data.fill_(2.0)
    again.update(model)
    assert torch.allclose(again.state["weight"], 0.5 * start + 0.5 * 2.0)
    assert again.state is ema.state, "updates the state it was given, in place"
    with pytest.raises(ValueError, match="decay"):
        Ema.from_state(ema.state, 1.0)


def test_soup_is_exact_at_the_ends_and_where_the_models_agree():
    g = torch.Generator().manual_seed(3)
    o = {"a": torch.randn(100, generator=g), "frozen": torch.randn(100, generator=g)}
    u = {"a": torch.randn(100, generator=g), "frozen": o["frozen"].clone()}
    assert torch.equal(soup(o, u, 0.0)["a"], o["a"]) and torch.equal(soup(o, u, 1.0)["a"], u["a"])
    for a in (0.1, 0.3, 0.7):
        assert torch.equal(soup(o, u, a)["frozen"], o["frozen"])


def test_eligible_layers_by_tower():
    from cliperase.engine.methods.subgroup import eligible_layers

    model = load_model("tiny-clip").model
    model.logit_scale.requires_grad_(True)
    groups = layer_groups(model)
    image = eligible_layers(groups, model, "image")
    both = eligible_layers(groups, model, "all")
    assert image and all(g.startswith("visual.") for g in image)
    assert set(image) < set(both) and "transformer.resblocks.0" in both
    assert "logit_scale" not in both
    model.visual.conv1.weight.requires_grad_(False)
    assert "visual.conv1" not in eligible_layers(groups, model, "image")


# ---------------------------------------------------------------------------------------------
# Whole runs of --method subgroup through launch/unlearn.py main() (tiny-clip, real shards).


def _run(tiny_data, tiny_checkpoint, out, steps, *sets):
    from launch import unlearn as cli

    args = run_args(tiny_data, out, pretrained=tiny_checkpoint, method="subgroup", steps=steps)
    for item in ("subgroup_layers=1", "subgroup_fisher_batches=2") + sets:
        args += ["--set", item]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    model = load_model("tiny-clip", str(out / "model.pt")).model.state_dict()
    original = load_model("tiny-clip", str(tiny_checkpoint)).model.state_dict()
    changed = {k for k, v in model.items() if not torch.equal(v, original[k])}
    return report["method_details"], changed


def _layer_params(layers):
    groups = layer_groups(load_model("tiny-clip").model)
    return {n for layer in layers for n in groups[layer]}


def test_subgroup_run_trains_only_the_chosen_layers_and_reports_them(tiny_data, tiny_checkpoint, tmp_path):
    # soup_tolerance 1: every a > 0 qualifies, so the soup keeps some of the training.
    details, changed = _run(tiny_data, tiny_checkpoint, tmp_path / "run", 4, "subgroup_forget_steps=2",
                            "soup_tolerance=1.0")
    assert details["stages"] == ["forget", "remind", "restore"]
    assert (details["forget_steps"], details["remind_steps"]) == (2, 2)
    assert (details["guard"], details["guard_margin"]) == (3.0, 0.0)
    assert len(details["layers"]) == 1 and details["layers"][0].startswith("visual.")
    assert details["fisher_top"][0]["layer"] == details["layers"][0]
    assert details["trainable_params"] > 0 and details["ema_decay"] == 0.9
    soup_ = details["soup"]
    assert 0.0 < soup_["a"] <= 1.0 and len(soup_["tried"]) == 10
    assert soup_["calibration_data"].endswith("eval") and soup_["calibration_is_eval_data"]
    selected = _layer_params(details["layers"])
    assert changed and changed <= selected, f"frozen layers changed: {sorted(changed - selected)}"


@pytest.mark.parametrize("stages, steps", [("forget", 2), ("restore", 1), ("remind,restore", 2)])
def test_subgroup_stages_run_alone(stages, steps, tiny_data, tiny_checkpoint, tmp_path):
    details, changed = _run(tiny_data, tiny_checkpoint, tmp_path / "run", steps, f'subgroup_stages="{stages}"',
                            "soup_tolerance=1.0")
    assert details["stages"] == stages.split(",")
    assert ("soup" in details) == ("restore" in stages)
    assert ("layers" in details) == (stages != "restore")
    assert ("ema_decay" in details) == ("remind" in stages)
    if stages == "restore":
        # No training: every soup of the input with itself scores alike, the tie goes to a = 1,
        # and the output is the input bit for bit.
        assert details["soup"]["a"] == 1.0 and not changed
    else:
        assert changed and changed <= _layer_params(details["layers"])


def test_setup_reuses_the_layers_in_its_state_on_resume(tiny_data):
    """On resume the engine restores ctx.state before setup: the layers chosen then are frozen
    again as they were, without reading data for new Fisher scores."""
    import copy
    from types import SimpleNamespace

    from cliperase.engine.config import UnlearnConfig
    from cliperase.engine.methods import get_method

    lm = load_model("tiny-clip")
    lm.model.logit_scale.requires_grad_(False)

    def no_data(which):
        raise AssertionError(f"setup read {which} batches although the state has its layers")

    state = {"layers": ["visual.layer2.0"], "fisher": {"visual.layer2.0": 3.0}, "prompts": torch.zeros(1, 8)}
    cfg = UnlearnConfig(method="subgroup", eval_data=str(tiny_data / "eval"), forget_classes=("circle",))
    ctx = SimpleNamespace(cfg=cfg, student=lm.model, teacher=copy.deepcopy(lm.model), tokenizer=lm.tokenizer,
                          device=torch.device("cpu"), batches=no_data, state=state)
    get_method(cfg).setup(ctx)
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable == set(layer_groups(lm.model)["visual.layer2.0"])
    assert state["prompts"].shape == (1, 8), "kept, not recomputed"


@pytest.mark.parametrize("name, shape, key, value", [("red-circle", "circle", "colour", "red"),
                                                     ("blue-square", "square", "colour", "blue"),
                                                     ("star-on-black", "star", "background", "black")])
def test_demo_task_splits_the_training_pairs_by_attribute(name, shape, key, value, tiny_data, tmp_path):
    """A subgroup task's forget set is exactly its subgroup of the same training pairs (red circles;
    blue squares; stars on black), and its generator arguments draw only that subgroup."""
    import tarfile

    from cliperase.engine.tools.demo import DEMO_TASKS
    from cliperase.engine.tools.synthetic import generate, split_pairs

    task = DEMO_TASKS[name]
    assert task.classes == (shape,) and task.forget_attributes == f"{key}={value}" and task.breakdown == key
    drawn = [s.meta for s in generate(40, 3, **task.generate_kwargs())]
    assert all(m["shape"] == shape and m[key] == value for m in drawn), drawn[:3]
    counts = split_pairs(tiny_data / "train", tmp_path / "split", forget=task.forgets)

    def members(folder):
        out = {}
        for shard in sorted(folder.glob("*.tar")):
            with tarfile.open(shard) as tar:
                out.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
        return out
    source, forget, retain = members(tiny_data / "train"), members(tmp_path / "split" / "forget"), members(tmp_path / "split" / "retain")
    metas = [json.loads(v) for k, v in forget.items() if k.endswith(".json")]
    assert counts["forget"] == len(metas) > 0 and all(m["shape"] == shape and m[key] == value for m in metas)
    kept = [json.loads(v) for k, v in retain.items() if k.endswith(".json")]
    assert not any(m["shape"] == shape and m[key] == value for m in kept)
    assert any(m["shape"] == shape for m in kept), "the siblings stay in the retain set"
    assert {**forget, **retain} == source, "every member copied byte for byte, none lost"


def test_subgroup_resumed_mid_run_ends_at_the_uninterrupted_weights(tiny_data, tiny_checkpoint, tmp_path):
    """The method state (layers, prompts, the EMA begun at the stage switch) goes through a
    checkpoint: continuing from step 2 of 4 gives the uninterrupted run's model."""
    from cliperase.engine import UnlearnConfig, unlearn
    from cliperase.engine.checkpoint import CHECKPOINTS

    out = tmp_path / "run"
    cfg = UnlearnConfig.from_dict(dict(
        model="tiny-clip", pretrained=str(tiny_checkpoint), forget_data=str(tiny_data / "forget"),
        retain_data=str(tiny_data / "retain"), eval_data=str(tiny_data / "eval"), forget_classes=("circle",),
        method="subgroup", steps=4, batch_size=8, lr=1e-4, subgroup_forget_steps=2, subgroup_layers=2,
        subgroup_fisher_batches=2, subgroup_ema_decay=0.5, soup_tolerance=1.0, save_every=2, output_dir=str(out)))
    first = unlearn(cfg, progress=False)
    whole = load_model("tiny-clip", str(out / "model.pt")).model.state_dict()
    again = unlearn(cfg.replace(resume=str(out / CHECKPOINTS / "step_00000002")), progress=False)
    resumed = load_model("tiny-clip", str(out / "model.pt")).model.state_dict()
    assert again["resumed_from"] and again["method_details"]["layers"] == first["method_details"]["layers"]
    assert again["method_details"]["soup"]["a"] == first["method_details"]["soup"]["a"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The embedded default built from nothing, as `make demo` does (data, pretrained tiny-clip)."""
    from cliperase.engine.tools.demo import prepare_demo

    cache = tmp_path_factory.mktemp("demo-cache")
    prepare_demo(cache, say=lambda _: None, progress=False, task="red-circle")
    return cache


# The issue names a sibling for red circles (blue circles: within 0.05); blue squares have none named.
@pytest.mark.parametrize("task, named_sibling", [("red-circle", "blue"), ("blue-square", None)])
@pytest.mark.parametrize("method", ["subgroup", "cliperase"])
def test_embedded_default_forgets_a_subgroup_and_keeps_its_siblings(method, task, named_sibling, demo_cache, tmp_path):
    """The issue's bar on the embedded default's subgroup tasks, with each method's defaults: red
    circles (blue squares) forgotten, the other colours of the class within 0.05 of the original
    on average, none more than 0.15 below it. Measured (compare, 2 threads; subgroup / cliperase):
    red circles 1.000 -> 0.000 / 0.000, largest sibling drop 0.000 / 0.050; blue squares 1.000 ->
    0.073 / 0.000, drop 0.026 / 0.026. With one thread CLIPErase's purple squares, the colour
    nearest blue, dropped 0.10 (4 of 39 images), hence a looser bound on single siblings.
    Stars on black, the third task, are not here: neither method forgets them without costing the
    other backgrounds (benchmarks/results/compare-subgroup.md)."""
    from cliperase.engine import unlearn
    from cliperase.engine.data import load_eval_set
    from cliperase.engine.tools.demo import DEMO_TASKS, demo_config
    from cliperase.engine.eval import evaluate

    (cls,), ((by, forgotten),) = DEMO_TASKS[task].classes, DEMO_TASKS[task].where
    cfg = demo_config(demo_cache, output_dir=str(tmp_path / "run"), task=task, progress=False, method=method)
    report = unlearn(cfg, progress=False)
    assert report["before"]["zeroshot"]["forget_acc"] == 1.0, f"the original knows the {forgotten} {cls}s"
    lm = load_model(cfg.model, str(tmp_path / "run" / "model.pt"))
    ev = load_eval_set(cfg.eval_data, lm.preprocess)
    attributes = ev.attributes
    after = evaluate(lm.model, lm.tokenizer, ev, cfg.forget_classes, attributes=attributes,
                     forget_where=cfg.forget_attributes, breakdown=by)
    original = load_model(cfg.model, cfg.pretrained)
    before = evaluate(original.model, original.tokenizer, ev, cfg.forget_classes, attributes=attributes, breakdown=by)
    now = {c: v["acc"] for c, v in after["zeroshot_by"][by][cls].items()}
    was = {c: v["acc"] for c, v in before["zeroshot_by"][by][cls].items()}
    siblings = [c for c in was if c != forgotten]
    assert len(siblings) == 5 and after["zeroshot"]["forget_acc"] == now[forgotten] <= 0.1, now
    mean = lambda acc: sum(acc[c] for c in siblings) / len(siblings)  # noqa: E731
    assert mean(now) >= mean(was) - 0.05, (now, was)
    assert all(now[c] >= was[c] - 0.15 for c in siblings), (now, was)
    assert named_sibling is None or now[named_sibling] >= was[named_sibling] - 0.05, (now, was)
    assert after["zeroshot"]["retain_acc"] >= report["before"]["zeroshot"]["retain_acc"] - 0.05
