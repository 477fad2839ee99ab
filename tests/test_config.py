"""OFTConfig: PEFT defaults and validation, target selection rules, adapter_config.json round trips."""

import dataclasses
import re

import pytest

from oftjax import OFTConfig

PEFT_DEFAULTS = dict(
    r=0,
    oft_block_size=32,
    module_dropout=0.0,
    target_modules=None,
    exclude_modules=None,
    layers_to_transform=None,
    layers_pattern=None,
    bias="none",
    init_weights=True,
    coft=False,
    eps=6e-5,
    block_share=False,
    use_cayley_neumann=True,
    num_cayley_neumann_terms=5,
    fan_in_fan_out=False,
    modules_to_save=None,
    task_type=None,
    base_model_name_or_path=None,
    revision=None,
    inference_mode=False,
    peft_version=None,
    legacy_neumann=False,
)


def test_defaults():
    cfg = OFTConfig()
    for name, value in PEFT_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert {f.name for f in dataclasses.fields(OFTConfig)} == set(PEFT_DEFAULTS)


def test_frozen_and_hashable():
    cfg = OFTConfig(target_modules=["q_proj", "v_proj"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 2
    assert cfg == OFTConfig(target_modules=["v_proj", "q_proj"])  # set semantics, as PEFT
    assert hash(cfg) == hash(OFTConfig(target_modules=("v_proj", "q_proj")))
    assert cfg.target_modules == frozenset({"q_proj", "v_proj"})


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(r=0, oft_block_size=0), ValueError, "Either `r` or `oft_block_size` must be non-zero"),
        (dict(r=4, oft_block_size=32), ValueError, r"only specify either r \(4\) or oft_block_size \(32\)"),
        (dict(layers_pattern="layers"), ValueError, "`layers_to_transform` must also be specified"),
        (dict(bias="lora_only"), ValueError, "bias: expected one of"),
        (dict(module_dropout=1.5), ValueError, r"module_dropout: must be in \[0, 1\]"),
        (dict(num_cayley_neumann_terms=0), ValueError, "num_cayley_neumann_terms: must be >= 1"),
        (dict(r=-1, oft_block_size=0), ValueError, "r: must be >= 0"),
        (dict(r=2.0, oft_block_size=0), TypeError, "r: expected an int"),
        (dict(eps=-1.0), ValueError, "eps: COFT radius"),
        (dict(task_type="CAUSAL"), ValueError, "Invalid task type"),
        (dict(target_modules=["q", 3]), TypeError, "target_modules: expected module names"),
        (dict(modules_to_save="lm_head"), TypeError, "wrap it in a list"),
        (dict(layers_to_transform=[0, "1"]), TypeError, "layers_to_transform"),
        (dict(coft=1), TypeError, "coft: expected True or False"),
        (dict(legacy_neumann=True, peft_version="0.18.0"), ValueError, "contradicts peft_version"),
        (dict(peft_version="latest"), ValueError, "cannot parse peft_version"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_validation_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        OFTConfig(**kwargs)


def test_error_says_what_to_change():
    with pytest.raises(ValueError, match=re.escape("OFTConfig(r=4, oft_block_size=0)")):
        OFTConfig(r=4, oft_block_size=32)


LLAMA_PATHS = [
    f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj")
] + [
    "model.layers.0.mlp.up_proj",
    "lm_head",
]


def _targets(cfg, paths=LLAMA_PATHS):
    return [p for p in paths if cfg.is_target(p)]


def test_list_targets_suffix_on_dot_boundary():
    cfg = OFTConfig(target_modules=["q_proj", "up_proj"])
    assert _targets(cfg) == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)] + [
        "model.layers.0.mlp.up_proj"
    ]
    assert not cfg.is_target("model.layers.0.self_attn.xq_proj")
    assert cfg.is_target("q_proj")  # exact name


def test_string_target_is_full_regex_match():
    cfg = OFTConfig(target_modules=r".*\.(q|v)_proj")
    assert _targets(cfg) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"]
    assert not OFTConfig(target_modules="q_proj").is_target("model.layers.0.self_attn.q_proj")  # fullmatch
    assert OFTConfig(target_modules="lin0").is_target("lin0")


def test_exclude_modules():
    assert _targets(OFTConfig(target_modules=["q_proj"], exclude_modules=["layers.1.self_attn.q_proj"])) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.self_attn.q_proj",
    ]
    assert _targets(OFTConfig(target_modules=["q_proj"], exclude_modules=r".*\.[02]\..*")) == [
        "model.layers.1.self_attn.q_proj"
    ]


def test_modules_to_save_never_targeted():
    cfg = OFTConfig(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    assert "lm_head" not in _targets(cfg)
    assert cfg.is_excluded("lm_head")


@pytest.mark.parametrize(
    "layers,pattern,expected",
    [
        ([1], "layers", [1]),
        (2, "layers", [2]),
        ([0, 2], None, [0, 2]),
        ([0, 2], ["h", "layers"], [0, 2]),
        ([1], "blocks", []),
        ([], None, [0, 1, 2]),
    ],
    ids=["list", "int", "no-pattern", "pattern-list", "wrong-pattern", "empty-list"],
)
def test_layers_to_transform(layers, pattern, expected):
    cfg = OFTConfig(target_modules=["q_proj"], layers_to_transform=layers, layers_pattern=pattern)
    assert _targets(cfg) == [f"model.layers.{i}.self_attn.q_proj" for i in expected]


def test_layers_to_transform_quirks_follow_peft():
    # The first number after the pattern is the layer (not an expert index further down).
    cfg = OFTConfig(target_modules=["w1"], layers_to_transform=[1], layers_pattern="layers")
    assert cfg.is_target("model.layers.1.experts.0.w1")
    assert not cfg.is_target("model.layers.0.experts.1.w1")
    # An exact-path match and a regex string skip the layer filter, as in PEFT.
    exact = OFTConfig(target_modules=["model.layers.0.self_attn.q_proj"], layers_to_transform=[1])
    assert exact.is_target("model.layers.0.self_attn.q_proj")
    regex = OFTConfig(target_modules=r".*q_proj", layers_to_transform=[1])
    assert regex.is_target("model.layers.0.self_attn.q_proj")


def test_target_modules_none_and_defaults():
    with pytest.raises(ValueError, match="with_default_targets"):
        OFTConfig().is_target("model.layers.0.self_attn.q_proj")
    cfg = OFTConfig().with_default_targets("qwen2")
    assert _targets(cfg) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"]
    with pytest.raises(ValueError, match="no default target_modules for model_type 'gpt2'"):
        OFTConfig().with_default_targets("gpt2")
    assert OFTConfig(target_modules="all-linear").is_all_linear


def test_to_dict_from_dict_round_trip():
    cfg = OFTConfig(
        r=2,
        oft_block_size=0,
        target_modules=["v_proj", "q_proj"],
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        coft=True,
        eps=1e-3,
        block_share=True,
        task_type="CAUSAL_LM",
    )
    d = cfg.to_dict()
    assert d["peft_type"] == "OFT" and d["auto_mapping"] is None and d["peft_version"] == "0.21.2"
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["layers_to_transform"] == [0, 1]
    assert "legacy_neumann" not in d
    back = OFTConfig.from_dict(d)
    assert back == dataclasses.replace(cfg, peft_version="0.21.2")
    assert back.to_dict() == d


def test_legacy_neumann_round_trip():
    cfg = OFTConfig(target_modules=["q_proj"], legacy_neumann=True)
    d = cfg.to_dict()
    assert d["peft_version"] == "0.17.1"
    with pytest.warns(UserWarning, match="legacy_neumann=True"):
        back = OFTConfig.from_dict(d)
    assert back.legacy_neumann


@pytest.mark.parametrize(
    "version,legacy",
    [
        (None, True),
        ("0.16.0", True),
        ("0.17.1", True),
        ("0.18.0", False),
        ("0.18.0.dev0@abc123", False),
        ("0.21.2", False),
    ],
    ids=lambda v: str(v),
)
def test_from_dict_infers_legacy_series(version, legacy):
    d = OFTConfig(target_modules=["q_proj"]).to_dict()
    if version is None:
        del d["peft_version"]  # PEFT 0.16/0.17 did not write the field
    else:
        d["peft_version"] = version
    if legacy:
        with pytest.warns(UserWarning, match="0.16-0.17 Cayley-Neumann series"):
            cfg = OFTConfig.from_dict(d)
    else:
        cfg = OFTConfig.from_dict(d)
    assert cfg.legacy_neumann is legacy


def test_from_dict_exact_cayley_is_never_legacy():
    d = OFTConfig(target_modules=["q_proj"], use_cayley_neumann=False).to_dict()
    del d["peft_version"]
    assert not OFTConfig.from_dict(d).legacy_neumann


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda d: d.update(lora_alpha=8), ValueError, r"unknown OFT config keys \['lora_alpha'\]"),
        (lambda d: d.update(peft_type="LORA"), ValueError, "peft_type is 'LORA'"),
        (lambda d: d.pop("oft_block_size"), ValueError, "OFT has been updated since PEFT 0.14.0"),
        (lambda d: d.update(r=4), ValueError, "my/adapter_config.json: You can only specify"),
    ],
    ids=["unknown-key", "peft-type", "v013", "both"],
)
def test_from_dict_errors_name_the_source(mutate, err, match):
    d = OFTConfig(target_modules=["q_proj"]).to_dict()
    mutate(d)
    with pytest.raises(err, match=match):
        OFTConfig.from_dict(d, source="my/adapter_config.json")
