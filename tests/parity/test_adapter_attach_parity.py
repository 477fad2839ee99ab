"""PEFT adapters trained in torch, attached to NNX models by ``interop.peft.load_adapter``, and back.

Real PEFT 0.21.2 everywhere: adapters trained a few steps and saved with ``save_pretrained``; what
``save_adapter`` writes is loaded with ``PeftModel.from_pretrained`` (no missing or unexpected keys) and gives
the same outputs. Also: named adapters in subfolders, PEFT 0.15 files (PEFT 0.21 silently drops them; we
convert them), PEFT 0.16-0.17 Cayley-Neumann files (evaluated with their own series).
"""

from __future__ import annotations

import copy
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import OFTConfig as TorchOFTConfig
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.numpy import save_file
from torch import nn

from interop import peft
from oftjax.nn import module_at
from oftjax.surgery import set_adapter
from tests.tolerances import TOL

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")

FWD = TOL["fp32_forward"]


# ----------------------------------------------------------------------------------------------------
# the same models in torch and NNX (module paths match: lin0, lin1; layers.0.lin, ..., head)


class TorchMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class TorchBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.lin(x))


class TorchDeep(nn.Module):
    def __init__(self, d=12, n=3):
        super().__init__()
        self.layers = nn.ModuleList([TorchBlock(d) for _ in range(n)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.lin0 = nnx.Linear(10, 20, rngs=rngs)
        self.lin1 = nnx.Linear(20, 2, rngs=rngs)

    def __call__(self, x):
        return self.lin1(nnx.relu(self.lin0(x)))


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.lin = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.lin(x))


class Deep(nnx.Module):
    def __init__(self, rngs, d=12, n=3):
        self.layers = nnx.List([Block(d, rngs) for _ in range(n)])
        self.head = nnx.Linear(d, 4, rngs=rngs)

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


MODELS = {"mlp": (TorchMLP, MLP, 10), "deep": (TorchDeep, Deep, 12)}


def _nnx_from_torch(kind, state):
    """The NNX model with the torch base weights (``state``: a torch state dict of the plain model)."""
    model = MODELS[kind][1](nnx.Rngs(0))
    for key, value in state.items():
        path, _, attr = key.rpartition(".")
        module = module_at(model, path)
        array = jnp.asarray(value.detach().numpy())
        getattr(module, "kernel" if attr == "weight" else "bias")[...] = (
            array.T if attr == "weight" else array
        )
    return model


def _train(peft_model, d_in, steps=3):
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        x = torch.randn(8, d_in, generator=gen)
        loss = peft_model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()


def _x(d_in):
    return np.random.default_rng(7).normal(size=(6, d_in)).astype(np.float32)


def _run(model, x):
    return np.asarray(nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x)))


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _peft_loads_cleanly(base, path):
    """``PeftModel.from_pretrained(base, path)``, asserting no missing and no unexpected adapter keys.

    from_pretrained warns on missing adapter keys only; the unexpected keys are checked on a copy with the
    same calls PEFT's ``load_adapter`` makes (``load_peft_weights`` + ``set_peft_model_state_dict``).
    """
    check = get_peft_model(copy.deepcopy(base), PeftConfig.from_pretrained(str(path)))
    result = set_peft_model_state_dict(check, load_peft_weights(str(path)))
    assert not result.unexpected_keys, result.unexpected_keys
    missing = [k for k in result.missing_keys if "oft_" in k]
    assert not missing, missing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, str(path))
    bad = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not bad, bad
    return loaded.eval()


CASES = {
    "mlp-r2-exact": (
        "mlp",
        dict(r=2, oft_block_size=0, target_modules=["lin0", "lin1"], use_cayley_neumann=False),
    ),
    "mlp-b2-neumann": ("mlp", dict(r=0, oft_block_size=2, target_modules=["lin0", "lin1"])),
    "mlp-coft": ("mlp", dict(r=2, oft_block_size=0, target_modules=["lin0", "lin1"], coft=True, eps=1e-2)),
    "mlp-block_share": (
        "mlp",
        dict(
            r=2, oft_block_size=0, target_modules=["lin0", "lin1"], block_share=True, use_cayley_neumann=False
        ),
    ),
    "mlp-coft-block_share-oft_only": (
        "mlp",
        dict(
            oft_block_size=2,
            target_modules=["lin0", "lin1"],
            coft=True,
            eps=1e-2,
            block_share=True,
            bias="oft_only",
        ),
    ),
    "deep-b5adjusted-t7": (
        "deep",
        dict(oft_block_size=5, target_modules=["lin", "head"], num_cayley_neumann_terms=7),
    ),
    "deep-r3-exact-bias_all": (
        "deep",
        dict(r=3, oft_block_size=0, target_modules=["lin"], use_cayley_neumann=False, bias="all"),
    ),
}


@pytest.mark.filterwarnings("ignore:Invalid `oft_block_size`")  # PEFT's adjustment warning (deep-b5adjusted)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_attach_trained_adapter_and_save_back(tmp_path, case):
    kind, kwargs = CASES[kind_case := case]
    torch_cls, _, d_in = MODELS[kind]
    torch.manual_seed(0)
    base = torch_cls()
    base_state = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "Adjusted oft_block_size" warning (deep-b5adjusted)
        pm = get_peft_model(base, TorchOFTConfig(init_weights=False, **kwargs))
    _train(pm, d_in)
    pm.save_pretrained(str(tmp_path / "peft"))
    x = _x(d_in)
    y_torch = _torch_out(pm, x)

    model = _nnx_from_torch(kind, base_state)  # untrained base: trained biases must come from the file
    paths = peft.load_adapter(model, tmp_path / "peft")
    assert paths == sorted(
        k.removeprefix("base_model.model.").removesuffix(".oft_R.weight")
        for k in peft.read_adapter(tmp_path / "peft")[1]
        if k.endswith("oft_R.weight")
    )
    config, _ = peft.read_adapter(tmp_path / "peft")
    peft.save_adapter(model, tmp_path / "jax", config=config)  # before the forward: COFT projects in place
    y_jax = _run(model, x)
    np.testing.assert_allclose(y_jax, y_torch, rtol=FWD.rtol, atol=FWD.atol, err_msg=kind_case)

    # what we wrote: the same tensors, the same flags, and PEFT loads it cleanly with the same outputs
    _, t_peft = peft.read_adapter(tmp_path / "peft")
    _, t_jax = peft.read_adapter(tmp_path / "jax")
    assert sorted(t_jax) == sorted(t_peft)
    for k in t_peft:
        np.testing.assert_array_equal(t_jax[k], t_peft[k], err_msg=k)
    raw_p = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    raw_j = json.loads((tmp_path / "jax" / "adapter_config.json").read_text())
    for key in (
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "coft",
        "eps",
        "block_share",
        "bias",
        "r",
        "oft_block_size",
        "target_modules",
    ):
        norm = lambda v: sorted(v) if isinstance(v, list) else v  # target_modules is a set in PEFT
        assert norm(raw_j[key]) == norm(raw_p[key]), key
    fresh = torch_cls()
    fresh.load_state_dict(base_state)
    loaded = _peft_loads_cleanly(fresh, tmp_path / "jax")
    np.testing.assert_array_equal(_torch_out(loaded, x), y_torch)

    # PEFT dir -> JAX-native -> PEFT dir: identical tensors, equivalent config
    peft.adapter_to_jax(tmp_path / "peft", tmp_path / "native")
    peft.adapter_to_peft(tmp_path / "native", tmp_path / "back")
    c_back, t_back = peft.read_adapter(tmp_path / "back")
    assert c_back == config
    assert sorted(t_back) == sorted(t_peft)
    for k in t_peft:
        np.testing.assert_array_equal(t_back[k], t_peft[k], err_msg=k)

    # without a config: inferred from the layers (full-path targets, r or block size, bias from OFTBias)
    peft.save_adapter(model, tmp_path / "inferred")
    fresh = torch_cls()
    fresh.load_state_dict(base_state)
    loaded = _peft_loads_cleanly(fresh, tmp_path / "inferred")
    np.testing.assert_allclose(_torch_out(loaded, x), y_torch, rtol=FWD.rtol, atol=FWD.atol)


def test_every_peft_config_key_is_handled_or_knowingly_ignored():
    from interop import _peft_format as fmt

    keys = set(TorchOFTConfig(target_modules=["lin0"]).to_dict())
    handled, ignored = fmt.config_fields(), set(fmt.IGNORED_CONFIG_KEYS)
    assert keys <= handled | ignored, sorted(keys - handled - ignored)
    assert not handled & ignored


def test_named_adapters_in_subfolders(tmp_path):
    torch.manual_seed(0)
    base = TorchDeep()
    base_state = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, TorchOFTConfig(oft_block_size=4, target_modules=["lin"], init_weights=False))
    pm.add_adapter(
        "other",
        TorchOFTConfig(
            r=2,
            oft_block_size=0,
            target_modules=["layers.1.lin", "head"],
            init_weights=False,
            use_cayley_neumann=False,
        ),
    )
    pm.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()
    x = _x(12)
    y_default = _torch_out(pm.eval(), x)
    pm.set_adapter("other")
    y_other = _torch_out(pm, x)

    model = _nnx_from_torch("deep", base_state)
    peft.load_adapter(model, tmp_path / "peft")
    assert peft.load_adapter(model, tmp_path / "peft", "other") == ["head", "layers.1.lin"]
    np.testing.assert_allclose(_run(model, x), y_default, rtol=FWD.rtol, atol=FWD.atol)
    set_adapter(model, "other")
    np.testing.assert_allclose(_run(model, x), y_other, rtol=FWD.rtol, atol=FWD.atol)

    peft.save_adapter(model, tmp_path / "jax")
    peft.save_adapter(model, tmp_path / "jax", "other")
    assert peft.list_adapters(tmp_path / "jax") == ["default", "other"]
    fresh = TorchDeep()
    fresh.load_state_dict(base_state)
    loaded = _peft_loads_cleanly(fresh, tmp_path / "jax")
    np.testing.assert_array_equal(_torch_out(loaded, x), y_default)
    result = loaded.load_adapter(str(tmp_path / "jax" / "other"), adapter_name="other")
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".other." in k]
    loaded.set_adapter("other")
    np.testing.assert_array_equal(_torch_out(loaded, x), y_other)


# ----------------------------------------------------------------------------------------------------
# old formats


def _cayley_exact(Q):
    eye = torch.eye(Q.shape[-1]).expand_as(Q)
    return torch.linalg.solve(eye + Q, eye - Q, left=False)


def test_v015_adapter_peft_drops_it_we_convert_it(tmp_path):
    """A v0.15.2-format file (oft_r [r,b,b] + oft_s [out,1]; docs/peft-oft.md, "Adapter files"): PEFT 0.21
    loads it silently as the identity; load_adapter reproduces v0.15's forward
    ``F.linear(x, (BD(R) W^T)^T * s, b)``."""
    torch.manual_seed(0)
    base = TorchMLP()
    base_state = copy.deepcopy(base.state_dict())
    D = torch.randn(2, 5, 5) * 0.3
    s = torch.ones(20, 1)
    raw = {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "block_share": False,
        "coft": False,
        "eps": 6e-05,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "module_dropout": 0.0,
        "modules_to_save": None,
        "oft_block_size": 0,
        "peft_type": "OFT",
        "r": 2,
        "revision": None,
        "target_modules": ["lin0"],
        "task_type": None,
    }
    (tmp_path / "v015").mkdir()
    (tmp_path / "v015" / "adapter_config.json").write_text(json.dumps(raw))
    save_file(
        {"base_model.model.lin0.oft_r": D.numpy(), "base_model.model.lin0.oft_s": s.numpy()},
        str(tmp_path / "v015" / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    x = _x(10)

    # v0.15's own forward, by hand (peft v0.15.2 tuners/oft/layer.py Linear.forward)
    R = _cayley_exact(0.5 * (D - D.transpose(1, 2)))
    W0 = base.lin0.weight.detach()
    W = (torch.block_diag(*R) @ W0.T).T * s
    with torch.no_grad():
        h = torch.relu(torch.nn.functional.linear(torch.from_numpy(x), W, base.lin0.bias))
        y_v015 = base.lin1(h).numpy()
        y_base = base(torch.from_numpy(x)).numpy()

    with pytest.warns(UserWarning, match="missing adapter keys"):
        dropped = PeftModel.from_pretrained(base, str(tmp_path / "v015"))
    np.testing.assert_array_equal(_torch_out(dropped.eval(), x), y_base)  # silently the identity
    assert np.abs(y_base - y_v015).max() > 100 * FWD.atol

    model = _nnx_from_torch("mlp", base_state)
    with pytest.warns(UserWarning, match="0.14-0.15"):
        peft.load_adapter(model, tmp_path / "v015")
    np.testing.assert_allclose(_run(model, x), y_v015, rtol=FWD.rtol, atol=FWD.atol)


def test_v017_neumann_adapter_uses_its_own_series(tmp_path):
    torch.manual_seed(0)
    base = TorchMLP()
    base_state = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, TorchOFTConfig(oft_block_size=5, target_modules=["lin0"], init_weights=False))
    with torch.no_grad():
        pm.base_model.model.lin0.oft_R["default"].weight.mul_(3.0)  # large enough for the series to differ
    pm.save_pretrained(str(tmp_path / "v017"))
    cfg_path = tmp_path / "v017" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    del raw["peft_version"]  # as PEFT 0.16/0.17 wrote it
    cfg_path.write_text(json.dumps(raw))
    vec = pm.base_model.model.lin0.oft_R["default"].weight.detach()
    x = _x(10)
    y_peft021 = _torch_out(pm.eval(), x)

    # the PEFT 0.16-0.17 series I + 2 sum_{k=1}^{t-1} Q^k, t = 5, by hand
    rows, cols = torch.triu_indices(5, 5, 1)
    Q = torch.zeros(2, 5, 5)
    Q[:, rows, cols] = vec
    Q = Q - Q.transpose(1, 2)
    R = torch.eye(5).expand(2, 5, 5).clone()
    Qk = torch.eye(5).expand(2, 5, 5)
    for _ in range(1, 5):
        Qk = Qk @ Q
        R = R + 2 * Qk
    with torch.no_grad():
        xr = torch.einsum("nrk,rkc->nrc", torch.from_numpy(x).reshape(-1, 2, 5), R).reshape(-1, 10)
        y_v017 = base.lin1(torch.relu(base.lin0.base_layer(xr))).numpy()
    assert np.abs(y_v017 - y_peft021).max() > 100 * FWD.atol

    model = _nnx_from_torch("mlp", base_state)
    with pytest.warns(UserWarning, match="0.16-0.17"):
        peft.load_adapter(model, tmp_path / "v017")
    np.testing.assert_allclose(_run(model, x), y_v017, rtol=FWD.rtol, atol=FWD.atol)


# ----------------------------------------------------------------------------------------------------
# our Llama (interop.hf_model.load_model) on float and bnb checkpoints saved by transformers


LLAMA_QUANT = {
    "float": None,
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.mark.parametrize(
    "base",
    # bnb bases add ~10 s each on the shared 2-core CPU: slow; float keeps the Llama path in the default run
    [pytest.param(b, marks=() if b == "float" else pytest.mark.slow) for b in LLAMA_QUANT],
    ids=list(LLAMA_QUANT),
)
def test_llama_adapter_on_float_and_bnb_checkpoints(tmp_path, base):
    """A PEFT adapter on a transformers Llama (float, nf4, int8 bases), attached to ``load_model``'s NNX Llama
    by module name (``model.layers.0.self_attn.q_proj`` ...): same logits; ``save_adapter`` writes the same
    tensors. int8 runs transformers in train mode (bnb's dequantize-then-matmul, as our Linear8bit)."""
    import transformers
    from transformers import BitsAndBytesConfig

    from interop import oracle
    from interop.hf_model import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
    hf.save_pretrained(tmp_path / "float")
    path = tmp_path / "float"
    if LLAMA_QUANT[base] is not None:
        oracle.use_default_cpu_dequant()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**LLAMA_QUANT[base]), dtype=torch.float32,
            device_map="cpu",
        )  # fmt: skip
        oracle.disable_cpu_repacking(hf)
        path = tmp_path / base
        hf.save_pretrained(path)  # before any forward (docs/oracle.md, repacking)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    pm = get_peft_model(hf, TorchOFTConfig(oft_block_size=16, target_modules=targets, init_weights=False))
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    pm.train(base == "int8")
    with torch.no_grad():
        want = pm(input_ids=ids).logits.numpy()

    ours = load_model(path)
    paths = peft.load_adapter(ours, tmp_path / "adapter")
    assert len(paths) == 8 and "model.layers.1.mlp.down_proj" in paths
    got = np.asarray(ours(jnp.asarray(ids.numpy())), dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=FWD.rtol, atol=FWD.atol)

    config, t_peft = peft.read_adapter(tmp_path / "adapter")
    peft.save_adapter(ours, tmp_path / "jax", config=config)
    _, t_jax = peft.read_adapter(tmp_path / "jax")
    assert sorted(t_jax) == sorted(t_peft)
    for k in t_peft:
        np.testing.assert_array_equal(t_jax[k], t_peft[k], err_msg=k)
