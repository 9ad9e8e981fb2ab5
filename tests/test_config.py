"""Bad input is refused before any model is built, every problem at once, each named."""
import json

import pytest

from cliperase.engine import ConfigError, UnlearnConfig, preflight, unlearn
from helpers import tiny_data  # noqa: F401


def _good(data, tmp_path, **kw):
    base = dict(forget_data=str(data / "forget"), retain_data=str(data / "retain"), eval_data=str(data / "eval"),
                forget_classes=("circle",), output_dir=str(tmp_path / "out"), steps=2, batch_size=4)
    base.update(kw)
    return UnlearnConfig.from_dict(base)


def test_good_config_has_no_problems(tiny_data, tmp_path):
    assert preflight.problems(_good(tiny_data, tmp_path)) == []


BAD = {
    "unknown method": (dict(method="forgetall"), "method: unknown method 'forgetall'"),
    "zero steps": (dict(steps=0), "steps: expected a positive integer"),
    "negative batch": (dict(batch_size=-4), "batch_size: expected a positive integer"),
    "zero lr": (dict(lr=0.0), "lr: expected a positive number"),
    "nan lr": (dict(lr=float("nan")), "lr: expected a positive number"),
    "negative lambda": (dict(lambda_f=-1.0), "lambda_f: expected a non-negative"),
    "bad forget mode": (dict(forget_mode="sine"), "forget_mode: expected one of"),
    "unknown model": (dict(model="ViT-B-33"), "model: unknown architecture 'ViT-B-33'. Did you mean"),
    "missing checkpoint": (dict(pretrained="/nonexistent/model.pt"), "pretrained: checkpoint file"),
    "unknown tag": (dict(model="ViT-B-32", pretrained="laion9000"), "pretrained: 'laion9000' is neither"),
    "missing forget shards": (dict(forget_data="/nonexistent/{0..3}.tar"), "forget_data: 4 of 4 shards do not exist"),
    "empty retain dir": (dict(retain_data="EMPTY"), "retain_data: "),
    "no eval set": (dict(eval_data="/nonexistent"), "eval_data: '/nonexistent' is not a directory"),
    "unknown forget class": (dict(forget_classes=("unicorn",)), "forget_classes: ['unicorn'] not in"),
    "no forget class": (dict(forget_classes=()), "forget_classes: name at least one"),
    "bad device": (dict(device="tpu"), "device: expected"),
    "bad loss impl": (dict(loss_impl="cuda"), "loss_impl: expected one of"),
    "negative eval_every": (dict(eval_every=-1), "eval_every: expected a non-negative integer"),
    "eval_every under ZeRO": (dict(eval_every=5, zero_stage=2), "eval_every: periodic evaluation runs on the single-process"),
}


@pytest.mark.parametrize("case", BAD.keys())
def test_each_bad_field_is_named(case, tiny_data, tmp_path):
    fields, message = BAD[case]
    if fields.get("retain_data") == "EMPTY":
        (tmp_path / "empty").mkdir()
        fields = dict(fields, retain_data=str(tmp_path / "empty"))
    problems = preflight.problems(_good(tiny_data, tmp_path, **fields))
    assert len(problems) == 1 and message in problems[0], problems


def test_all_problems_reported_at_once(tiny_data, tmp_path):
    cfg = _good(tiny_data, tmp_path, steps=0, lr=-1.0, method="nope")
    with pytest.raises(ConfigError) as exc:
        unlearn(cfg)
    assert len(exc.value.problems) == 3
    assert not (tmp_path / "out").exists(), "nothing may be written for an invalid config"


def test_output_dir_holding_a_run_is_refused_unless_overwrite(tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({}))
    assert any("holds another run" in p for p in preflight.problems(_good(tiny_data, tmp_path)))
    assert preflight.problems(_good(tiny_data, tmp_path, overwrite=True)) == []


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="stepz: unknown config field"):
        UnlearnConfig.from_dict({"stepz": 3})


def test_config_overrides_file_then_set_items(tmp_path):
    from cliperase.engine.config import config_overrides

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 5, "lr": 0.1}))
    got = config_overrides(str(f), ["steps=7", "forget_mode=hinge", "forget_classes=[\"a\", \"b\"]"])
    assert got == {"steps": 7, "lr": 0.1, "forget_mode": "hinge", "forget_classes": ["a", "b"]}
    with pytest.raises(ConfigError, match="--set 'stepz=3'"):
        config_overrides(None, ["stepz=3"])
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="config: cannot read"):
        config_overrides(str(f), [])
