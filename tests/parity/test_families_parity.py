"""Qwen3, Gemma 2, Gemma 3 and Phi-3 at real widths against transformers (+ bitsandbytes, + PEFT).

Each family is a transformers model built from the published config of a real checkpoint
(tests/models/_family_configs.py: Qwen3-0.6B, Gemma-2-2b, Gemma-3-270m and -1b, Phi-3-mini-4k and -128k; plus
Llama-3.2-1B for llama3 rope at long range), cut to two decoder layers with widths and vocabularies as
published, every parameter drawn from a fixed seed (norms and biases too, so every name mapping is exercised),
saved with ``save_pretrained``; bnb checkpoints are what transformers + bitsandbytes write when quantizing
that checkpoint on load. The JAX side loads the directories with ``interop.hf_model.load_model``. Bounds:
``TOL["family_logits_fp32"]`` and the same top-1 token everywhere.

The default suite runs the three smallest families in their QOFT base format (NF4 + double quantization)
with the CPU kernels off and on, their bnb checkpoints saved back byte for byte, positions past 1,024 on
Gemma 3, and ``oftjax parity`` / ``oftjax train`` on Gemma 3. The other cross products (float, NF4, int8;
Gemma-2-2b, Gemma-3-1b, Phi-3-mini-128k, Llama-3.2-1B; PEFT adapters both ways; 1,040-token sequences) are
marked ``slow``. tests/parity/test_families_small_parity.py runs every family at small widths (adapters
both ways included) in the default suite.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from interop import oracle
from interop.hf_model import load_model, save_model
from interop.peft import load_adapter, save_adapter
from oftjax import OFTConfig, apply_oft
from oftjax.cli import main
from oftjax.nn import OFTParam
from tests.models._family_configs import PUBLISHED, two_layers
from tests.models.test_config_published import LLAMA_3_2_1B_INSTRUCT
from tests.parity._family_helpers import assert_logits_close, jax_logits, peft_loads_cleanly, targets
from tests.tolerances import TOL

# layer, model and training parity: with the pure-JAX default and with the CPU kernels (tests/conftest.py)
kernels = pytest.mark.usefixtures("kernels")

CONFIGS = {**PUBLISHED, "llama-3.2-1b": LLAMA_3_2_1B_INSTRUCT}
DEFAULT_FAMILIES = ("qwen3-0.6b", "gemma-3-270m", "phi-3-mini-4k")
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
BATCH, SEQ = 2, 8
FAR = {"phi-3-mini-128k": 4090}  # positions past Phi-3's 4,096: LongRoPE's long factors; elsewhere past 1,024
ADAPTER_BLOCK = {"gemma-3-270m": 48}  # 640 % 48 != 0: PEFT's block-size adjustment (oftjax/oft/_adjust.py)


class Family:
    """One family's checkpoints (float and bnb variants, built on first use) and transformers' logits on them.

    ``logits[variant]``: ``{"plain": no mask, "padded": left padding on row 1, "far": positions from 1,024
    (float only)}``, computed by the torch model that wrote the directory, right after writing it.
    """

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        self.config = two_layers(CONFIGS[name])
        self.model_type = self.config["model_type"]
        vocab = self.config["vocab_size"]
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        self.mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        self.mask[1, :2] = 0
        self.far = torch.arange(SEQ)[None].expand(BATCH, SEQ) + FAR.get(name, 1024)
        self.dirs: dict[str, Path] = {}
        self.logits: dict[str, dict[str, np.ndarray]] = {}
        self.adapters: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}

    def dir(self, variant: str) -> Path:
        if variant not in self.dirs:
            if variant == "float":
                self._build_float()
            else:
                self._build_quantized(variant)
        return self.dirs[variant]

    def _build_float(self) -> None:
        cfg = transformers.AutoConfig.for_model(**self.config)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # HF initializes norms to 1 (Gemma: 0) and biases to 0: draw everything
            for name, p in model.named_parameters():
                p.normal_(0.0, 0.05, generator=g)
                if "norm" in name and not self.model_type.startswith("gemma"):
                    p.add_(1.0)
        path = self.root / "float"
        model.save_pretrained(path)
        self.dirs["float"] = path
        self.logits["float"] = self._reference(model, far=True)
        del model
        gc.collect()

    def _build_quantized(self, variant: str) -> None:
        oracle.use_default_cpu_dequant()
        qcfg = transformers.BitsAndBytesConfig(**QUANT[variant], bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            self.dir("float"), quantization_config=qcfg, dtype=torch.float32, device_map="cpu"
        )
        oracle.disable_cpu_repacking(model)
        path = self.root / variant
        model.save_pretrained(path)  # before any forward (docs/oracle.md, repacking)
        model.train(
            variant == "int8"
        )  # bnb's int8 training path: dequantize, then matmul (test_model_parity)
        self.dirs[variant] = path
        self.logits[variant] = self._reference(model)
        del model
        gc.collect()

    def _reference(self, model, far: bool = False) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = {
                "plain": model(input_ids=self.ids).logits.float().numpy(),
                "padded": model(input_ids=self.ids, attention_mask=self.mask).logits.float().numpy(),
            }
            if far:
                out["far"] = model(input_ids=self.ids, position_ids=self.far).logits.float().numpy()
        return out

    def targets(self) -> list[str]:
        return targets(self.model_type)

    def oft_model(self) -> Any:
        """The NF4 + DQ checkpoint in JAX with OFT on every projection, rotations drawn from a fixed seed."""
        ours = load_model(self.dir("nf4-dq"))
        cfg = OFTConfig(r=0, oft_block_size=ADAPTER_BLOCK.get(self.name, 32), target_modules=self.targets())
        assert len(apply_oft(ours, cfg, rngs=nnx.Rngs(0))) == len(self.targets()) * 2
        rng = np.random.default_rng(3)
        for _, var in nnx.to_flat_state(nnx.state(ours, OFTParam)):
            var.set_value(
                jnp.asarray(rng.normal(0.0, 0.05, var.shape), var.dtype)
            )  # a trained-looking rotation
        return ours

    def jax_adapter(self) -> tuple[Path, dict[str, np.ndarray]]:
        """``oft_model()``'s adapter saved by oftjax, loaded by ``PeftModel.from_pretrained`` on the bnb model
        (no missing keys), and PEFT's logits with it (computed once)."""
        if "jax" not in self.adapters:
            path = self.root / "jax_adapter"
            save_adapter(self.oft_model(), path)
            peft_model = peft_loads_cleanly(oracle.load_causal_lm(self.dir("nf4-dq")), path)
            self.adapters["jax"] = path, self._reference(peft_model)
            del peft_model
            gc.collect()
        return self.adapters["jax"]

    def peft_adapter(self) -> tuple[Path, dict[str, np.ndarray]]:
        """A PEFT OFT adapter trained 3 steps (AdamW) on the bnb model, and PEFT's logits with it (once)."""
        if "peft" not in self.adapters:
            import peft

            model = oracle.load_causal_lm(self.dir("nf4-dq"))
            cfg = peft.OFTConfig(
                r=0,
                oft_block_size=ADAPTER_BLOCK.get(self.name, 32),
                target_modules=self.targets(),
                task_type="CAUSAL_LM",
            )
            model = peft.get_peft_model(model, cfg)
            oracle.disable_cpu_repacking(model)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
            for _ in range(3):
                model(input_ids=self.ids, labels=self.ids).loss.backward()
                opt.step()
                opt.zero_grad()
            path = self.root / "peft_adapter"
            model.eval().save_pretrained(path)
            self.adapters["peft"] = path, self._reference(model)
            del model, opt
            gc.collect()
        return self.adapters["peft"]


class FamilyStore:
    """The families built so far in this module (checkpoints on disk, no model kept in memory)."""

    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def __getitem__(self, name: str) -> Family:
        if name not in self.built:
            (self.root / name).mkdir()
            self.built[name] = Family(name, self.root / name)
        return self.built[name]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    built = FamilyStore(tmp_path_factory.mktemp("families"))
    yield built
    shutil.rmtree(built.root, ignore_errors=True)  # GBs of checkpoints


@pytest.fixture
def family(store, request):
    return store[request.param]


def _params(names, *, default=DEFAULT_FAMILIES, variants=(None,), default_variant=None):
    """``pytest.param``s over families (x variants): slow unless the family (and variant) is a default one."""
    out = []
    for name in names:
        for v in variants:
            fast = name in default and (v is None or v == default_variant)
            args = (name,) if v is None else (name, v)
            out.append(
                pytest.param(*args, marks=() if fast else pytest.mark.slow, id="-".join(map(str, args)))
            )
    return out


ALL = tuple(PUBLISHED)


def check_model(fam: Family, model, want: dict[str, np.ndarray]) -> None:
    keep = fam.mask.numpy().astype(bool)  # transformers leaves fully masked rows undefined: real tokens only
    assert_logits_close(jax_logits(model, fam.ids), want["plain"])
    assert_logits_close(jax_logits(model, fam.ids, fam.mask), want["padded"], keep)


# ----------------------------------------------------------------------------------------------------------
# logits: float, NF4, NF4 + double quant, int8


@kernels
@pytest.mark.parametrize(
    "family,variant",
    _params(ALL, variants=("float", "nf4", "nf4-dq", "int8"), default_variant="nf4-dq"),
    indirect=["family"],
)
def test_logits_match_transformers(family, variant):
    from oftjax.nn import Linear4bit, Linear8bit

    ours = load_model(family.dir(variant))
    assert ours.config.model_type == family.model_type
    first = ours.model.layers[0].self_attn
    proj = first.qkv_proj if family.model_type == "phi3" else first.q_proj
    kind = {"float": nnx.Linear, "int8": Linear8bit}.get(variant, Linear4bit)
    assert isinstance(proj, kind)
    check_model(family, ours, family.logits[variant])


@kernels
@pytest.mark.parametrize("family", _params(("gemma-3-270m", "gemma-2-2b", "phi-3-mini-128k")), indirect=True)
def test_positions_past_1024_match_transformers(family):
    """RoPE at positions 1,024+ (Phi-3-mini-128k: 4,090+, past its original 4,096: the long factors);
    Gemma 3's sliding and global layers each with its own theta."""
    ours = load_model(family.dir("float"))
    assert_logits_close(jax_logits(ours, family.ids, positions=family.far), family.logits["float"]["far"])


@pytest.mark.parametrize(
    "family,variant",
    _params(ALL, variants=("nf4", "nf4-dq", "int8"), default_variant="nf4-dq"),
    indirect=["family"],
)
def test_save_model_writes_the_bnb_checkpoint_back_byte_for_byte(family, variant, tmp_path):
    src = family.dir(variant)
    save_model(load_model(src), tmp_path / "out")
    with (
        safe_open(src / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "out" / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            ta, tb = a.get_tensor(key), b.get_tensor(key)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
            assert torch.equal(ta, tb), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert config["quantization_config"] == source["quantization_config"]
    assert config["model_type"] == family.model_type


# ----------------------------------------------------------------------------------------------------------
# PEFT OFT adapters, both ways, on the QOFT base (NF4 + double quant)


@kernels
@pytest.mark.slow
@pytest.mark.parametrize("family", ALL, indirect=True)
def test_peft_trained_adapter_loads_in_jax(family):
    path, want = family.peft_adapter()
    assert np.abs(want["plain"] - family.logits["nf4-dq"]["plain"]).max() > 1e-3, "training changed nothing"
    ours = load_model(family.dir("nf4-dq"))
    assert load_adapter(ours, path)
    check_model(family, ours, want)


@kernels
@pytest.mark.slow
@pytest.mark.parametrize("family", ALL, indirect=True)
def test_jax_adapter_loads_in_peft(family):
    _, want = family.jax_adapter()
    assert np.abs(want["plain"] - family.logits["nf4-dq"]["plain"]).max() > 1e-3, (
        "the adapter changed nothing"
    )
    check_model(family, family.oft_model(), want)


# ----------------------------------------------------------------------------------------------------------
# the command line on a new family


@pytest.mark.parametrize("family", _params(("gemma-3-270m",)), indirect=True)
def test_oftjax_parity_and_train_accept_the_family(family, tmp_path, capsys):
    qdir = family.dir("nf4-dq")
    assert main(["parity", "--model", str(qdir), "--seq-len", "8", "--per-layer"]) == 0
    assert "PASS" in capsys.readouterr().out
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    argv = ["train", "--model", str(qdir), "--data", str(data), "--output", str(tmp_path / "run"), "--quiet",
            "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--oft-block-size", "32",
            "--target-modules", ",".join(family.targets()), "--eval-every", "0",
            "--save-every", "0"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quant"] == "nf4"
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(family.targets())


# ----------------------------------------------------------------------------------------------------------
# long sequences: 1,040 tokens (past Gemma 3's 512-token window)

LONG = 1040


@kernels
@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma-3-270m", "llama-3.2-1b", "phi-3-mini-128k"], indirect=True)
def test_long_sequence_matches_transformers(family):
    """Final hidden states at all 1,040 positions and the logits of the last 64 (a 262,144-column logits
    matrix per token is what a long test would otherwise hold), batch 1."""
    ids = torch.randint(0, family.config["vocab_size"], (1, LONG), generator=torch.Generator().manual_seed(5))
    model = transformers.AutoModelForCausalLM.from_pretrained(family.dir("float"), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        want_logits = model.lm_head(hidden[:, -64:]).numpy()
        want_hidden = hidden.numpy()
    del model
    gc.collect()
    ours = load_model(family.dir("float"))
    graph, state = nnx.split(ours)
    got_hidden = jax.jit(lambda st, i: nnx.merge(graph, st).model(i))(state, jnp.asarray(ids.numpy()))
    got_logits = jax.jit(lambda st, h: nnx.merge(graph, st).logits(h))(state, got_hidden[:, -64:])
    tol = TOL["family_logits_fp32"]
    err = np.abs(np.asarray(got_hidden, np.float64) - want_hidden).max()
    assert err <= tol.rtol * np.abs(want_hidden).max() + tol.atol
    assert_logits_close(np.asarray(got_logits), want_logits)
