"""Subgroup forgetting's pieces on constructed cases with known answers."""
import pytest
import torch
from torch import nn

from cliperase.engine.models import load_model
from cliperase.engine.subgroup import Ema, fisher_scores, layer_groups, search_soup, soup, top_layers, trainable_only


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
