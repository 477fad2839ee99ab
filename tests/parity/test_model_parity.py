"""Logits parity of oftjax.models with transformers (+ bitsandbytes) on tiny saved checkpoints.

Real parts only: tiny Llama / Mistral / Qwen2 models built by transformers with fixed seeds, saved with
``save_pretrained``; bnb checkpoints written by transformers after quantizing on load (docs/oracle.md, "Other
traps"). The JAX side loads the directories with ``interop.hf_model.load_model``; ``save_model`` output is
loaded back by transformers. Padding masks are exercised (right and left padding; only real-token positions
are compared, since transformers leaves fully masked query rows undefined).
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig

from interop import oracle
from interop.hf_model import load_model, save_model
from tests._tiny import TINY_LLAMA
from tests.tolerances import TOL

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernels")

LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)  # fmt: skip  (wavelengths straddle 16/4 and 16/1: all three llama3 branches are taken)
FLOAT_CASES = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", {"rope_parameters": LLAMA3}),
    "llama-linear-rope": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
    "llama-bias-headdim": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    "mistral-window": ("MistralConfig", {"sliding_window": 4}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2-window": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    ),
}
QUANT_CASES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-dq-bf16-storage": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,
    ),
    "int8": dict(load_in_8bit=True),
}
SEQ = 10


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, SEQ), generator=g)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def jax_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())), dtype=np.float32)


def assert_close_on_tokens(got, want, mask, tol):
    keep = mask.numpy().astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], rtol=tol.rtol, atol=tol.atol)


def build_hf(kind, kw, seed=0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, kind)(**TINY_LLAMA, **kw)
    arch = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM"}.get(
        kind, "Qwen2ForCausalLM"
    )
    model = getattr(transformers, arch)(cfg).eval()
    with (
        torch.no_grad()
    ):  # HF inits biases to 0 and norms to 1: randomize everything so each mapping is tested
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 64 else 0.0))
    return model


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    out = {}
    for name, (kind, kw) in FLOAT_CASES.items():
        model = build_hf(kind, kw)
        path = tmp_path_factory.mktemp("float") / name
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="module")
def quant_dirs(float_dirs, tmp_path_factory):
    oracle.use_default_cpu_dequant()
    src = float_dirs["llama"][0]
    out = {}
    for name, kw in QUANT_CASES.items():
        qcfg = BitsAndBytesConfig(**kw, bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src, quantization_config=qcfg, dtype=torch.float32, device_map="cpu"
        )
        oracle.disable_cpu_repacking(model)
        path = tmp_path_factory.mktemp("quant") / name
        model.save_pretrained(path)  # before any forward (docs/oracle.md, repacking)
        out[name] = (path, model)
    return out


@pytest.mark.parametrize("name", list(FLOAT_CASES), ids=list(FLOAT_CASES))
def test_float_logits_match_transformers(float_dirs, name):
    path, hf_model = float_dirs[name]
    ids, mask = inputs()
    ours = load_model(path)
    assert ours.config.model_type == hf_model.config.model_type
    assert_close_on_tokens(
        jax_logits(ours, ids, mask), hf_logits(hf_model, ids, mask), mask, TOL["fp32_forward"]
    )


def test_window_cases_really_use_the_window(float_dirs, tmp_path):
    """Guard against a vacuous pass: without the window the late tokens' logits change."""
    path, _ = float_dirs["mistral-window"]
    shutil.copytree(path, tmp_path / "full")
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    (tmp_path / "full" / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    ids, mask = inputs()
    windowed, full = (
        jax_logits(load_model(path), ids, mask),
        jax_logits(load_model(tmp_path / "full"), ids, mask),
    )
    early = mask.numpy().astype(bool) & (np.arange(SEQ) < 4)  # the window (4) does not bind yet
    np.testing.assert_allclose(
        windowed[early], full[early], rtol=TOL["fp32_forward"].rtol, atol=TOL["fp32_forward"].atol
    )
    assert not np.allclose(windowed[0, -1], full[0, -1])


@pytest.mark.parametrize("name", list(QUANT_CASES), ids=list(QUANT_CASES))
def test_bnb_logits_match_transformers_bitsandbytes(quant_dirs, name):
    """4-bit: the exact bnb formula (fp32 compute) -> fp32 tolerance. int8: transformers in train mode runs
    bnb's MatMul8bitFp (dequantize, then matmul), which we reproduce; eval mode quantizes activations
    (~1e-2 relative here; docs/bitsandbytes-formats.md, "int8 paths"), which we do not."""
    from oftjax.nn import Linear4bit, Linear8bit

    path, hf_model = quant_dirs[name]
    ours = load_model(path)
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear8bit if name == "int8" else Linear4bit)
    assert ours.lm_head.kernel.dtype == jnp.float32  # transformers never quantizes lm_head
    ids, mask = inputs()
    hf_model.train(name == "int8")
    try:
        want = hf_logits(hf_model, ids, mask)
    finally:
        hf_model.eval()
    assert_close_on_tokens(jax_logits(ours, ids, mask), want, mask, TOL["fp32_forward"])


@pytest.mark.parametrize("name", ["llama", "qwen2-tied", "llama-bias-headdim"], ids=str)
def test_save_model_loads_in_transformers_with_same_logits(float_dirs, tmp_path, name):
    path, hf_model = float_dirs[name]
    save_model(load_model(path), tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = inputs()
    np.testing.assert_array_equal(hf_logits(again, ids, mask), hf_logits(hf_model, ids, mask))


@pytest.mark.parametrize("name", ["nf4-dq", "fp4", "int8"], ids=str)
def test_save_quantized_model_round_trips_through_transformers(quant_dirs, tmp_path, name):
    from safetensors import safe_open

    path, hf_model = quant_dirs[name]
    save_model(load_model(path), tmp_path / "out")
    with (
        safe_open(path / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "out" / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", device_map="cpu", dtype=torch.float32
    )
    oracle.disable_cpu_repacking(again)
    ids, mask = inputs()
    for m in (again, hf_model):
        m.train(name == "int8")
    try:
        np.testing.assert_array_equal(hf_logits(again, ids, mask), hf_logits(hf_model, ids, mask))
    finally:
        hf_model.eval()


def test_rope_inv_freq_matches_transformers(float_dirs):
    from oftjax.models._rope import inv_freq

    for name in ("llama", "llama3-rope", "llama-linear-rope"):
        path, hf_model = float_dirs[name]
        ours = inv_freq(load_model(path).config)
        want = hf_model.model.rotary_emb.inv_freq.numpy()
        np.testing.assert_allclose(ours, want, rtol=1e-7, err_msg=name)


def test_bf16_checkpoint_loads_in_bf16(float_dirs, tmp_path):
    path, hf_model = float_dirs["llama"]
    bf16 = tmp_path / "bf16"
    shutil.copytree(path, bf16)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    hf_bf16.save_pretrained(bf16, safe_serialization=True)
    ours = load_model(bf16)
    assert ours.model.embed_tokens.embedding.dtype == jnp.bfloat16
    ids, mask = inputs()
    got = jax_logits(ours, ids, mask)
    assert_close_on_tokens(got, hf_logits(hf_bf16, ids, mask), mask, TOL["bf16_model_forward"])
    as_fp32 = load_model(bf16, dtype=jnp.float32)
    assert as_fp32.model.norm.weight.dtype == jnp.float32


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4"], ids=str)
def test_bnb_cuda_logits_match(float_dirs, tmp_path, name):
    """CUDA bitsandbytes (quantized on the GPU with CUDA rounding, saved) vs JAX on its default backend.

    Both sides run fp32 matmuls at full precision (torch disables TF32 for matmuls by default; JAX is asked
    for "highest"), so the 4-bit formula gives the fp32 tolerance as on the CPU.
    """
    import jax

    path = float_dirs["llama"][0]
    qcfg = BitsAndBytesConfig(**QUANT_CASES[name], bnb_4bit_compute_dtype=torch.float32)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qcfg, dtype=torch.float32, device_map="cuda"
    ).eval()
    hf_model.save_pretrained(tmp_path / name)
    ids, mask = inputs()
    with torch.no_grad():
        want = hf_model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu().numpy()
    with jax.default_matmul_precision("highest"):
        got = jax_logits(load_model(tmp_path / name), ids, mask)
    assert_close_on_tokens(got, want, mask, TOL["fp32_forward"])


def test_partly_quantized_model_saves_skip_modules(float_dirs, quant_dirs, tmp_path):
    """Float projections among NF4 ones are written as float and listed in llm_int8_skip_modules."""
    import bitsandbytes as bnb

    ours = load_model(quant_dirs["nf4-dq"][0])
    float_model = load_model(float_dirs["llama"][0])
    ours.model.layers[0].self_attn.q_proj = float_model.model.layers[0].self_attn.q_proj
    ours.model.layers[1].mlp.down_proj = float_model.model.layers[1].mlp.down_proj
    save_model(ours, tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    skip = config["quantization_config"]["llm_int8_skip_modules"]
    assert skip == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mixed", device_map="cpu", dtype=torch.float32
    )
    oracle.disable_cpu_repacking(again)
    assert not isinstance(again.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(again.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    ids, mask = inputs()
    assert_close_on_tokens(
        jax_logits(ours, ids, mask), hf_logits(again.eval(), ids, mask), mask, TOL["fp32_forward"]
    )


@pytest.mark.parametrize("name", ["nf4-dq", "fp4", "int8"], ids=str)
def test_jax_quantized_model_saves_what_transformers_writes(float_dirs, quant_dirs, tmp_path, name):
    """Float checkpoint -> load_model -> quantize every projection in JAX (bnb CPU rounding) -> save_model:
    the directory equals what transformers + bitsandbytes write when quantizing the same checkpoint on load
    (every tensor byte for byte, same quantization_config)."""
    from safetensors import safe_open

    from interop.hf_model import linear_paths
    from oftjax.nn import Linear4bit, Linear8bit

    ours = load_model(float_dirs["llama"][0])
    for path in linear_paths(ours.config)[:-1]:  # all but lm_head, as transformers
        parent, _, attr = path.rpartition(".")
        holder = ours
        for part in parent.split("."):
            holder = holder[int(part)] if part.isdigit() else getattr(holder, part)
        weight = getattr(holder, attr).kernel[...].T
        kw = QUANT_CASES[name]
        if name == "int8":
            layer = Linear8bit.from_float(weight)
        else:
            dq = kw.get("bnb_4bit_use_double_quant", False)
            layer = Linear4bit.from_float(
                weight, quant_type=kw["bnb_4bit_quant_type"], compress_statistics=dq
            )
        setattr(holder, attr, layer)
    save_model(ours, tmp_path / "ours")
    theirs = quant_dirs[name][0]
    with (
        safe_open(theirs / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "ours" / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((theirs / "config.json").read_text())["quantization_config"]
    )
