"""Generation speed: oftjax.generate against transformers' generate (+ PEFT, + bitsandbytes NF4 and int8).

The real SmolLM2-135M-Instruct (``interop/real_model.py``; ``--model`` another checkpoint), float32, greedy,
prompts of ``--prompt-len`` tokens (real text from the packaged chat set), ``--new-tokens`` new tokens with no
stop at eos (both sides run the full length), at each ``--batches`` size, for each variant: the float model,
NF4 with double quantization (both sides quantize the float checkpoint on load, to the same bytes), NF4
with an OFT adapter on all seven projections (block size 32; a PEFT adapter with random rotations, written
once, loaded by both sides), and 8-bit (``load_in_8bit``: LLM.int8 with threshold 6.0 on both sides, as
transformers runs an 8-bit model in eval mode), with or without that adapter.
oftjax runs as ``oftjax generate`` does on a CPU (the CPU kernels on);
transformers with its default attention (SDPA), bitsandbytes' own CPU dequantize kernel (correct for these
shapes: every ``in_features`` is a multiple of the blocksize; docs/oracle.md) and the fp32 4-bit path (its
AVX512-BF16 repacking off, as the oracle runs it). Both sides run in this process, taking turns call by
call; the first call of each (compilation, warm-up) is not timed.

Measured per call:

* time to first token (prefill): oftjax's ``GenerationResult.prefill_seconds``; transformers' from the call
  to the first call of a logits processor (which runs right after the prompt's forward);
* decode tokens/s: the tokens after the first (all rows) over the time after the first token (oftjax's
  ``decode_tokens_per_s``; transformers' from the first logits-processor call to the end of ``generate``);
* KV cache memory: oftjax's ``GenerationResult.cache_bytes`` (a static cache of prompt bucket + decode
  chunks); transformers' ``DynamicCache`` tensors after the call;
* compilations: backend compiles (``jax.monitoring``) during a second ``generate`` with a new prompt length
  inside the same bucket (``--prompt-len`` minus 9 tokens): must be 0.

The medians over ``--reps`` calls and the ratios oftjax/transformers are printed as a Markdown table.

Usage: python benchmarks/bench_generate.py [--model DIR] [--batches 1,8]
           [--variants float,nf4,nf4+adapter,int8,int8+adapter]
           [--prompt-len 64 --new-tokens 128 --reps 3] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("float", "float+adapter", "nf4", "nf4+adapter", "int8", "int8+adapter")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Call:
    """One timed generate call."""

    ttft: float
    decode_tps: float
    cache_bytes: int


# ------------------------------------------------------------------------------------------------- inputs


def prompts(model_dir: Path, batch: int, length: int) -> list[list[int]]:
    """``batch`` windows of ``length`` tokens of the packaged chat set's text (real tokens, no padding)."""
    import json

    from oftjax.chat_data import ChatTokenizer, pydoc_chat_paths

    tok = ChatTokenizer.from_checkpoint(model_dir)
    text = " ".join(
        m["content"]
        for line in pydoc_chat_paths()["train"].read_text().splitlines()[:64]
        for m in json.loads(line)["messages"]
    )
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < batch * length:
        raise SystemExit(f"the chat set gives {len(ids)} tokens, fewer than {batch} x {length}")
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


def write_adapter(model_dir: Path, out: Path) -> Path:
    """A PEFT OFT adapter with random rotations (``init_weights=False``) on every projection."""
    import peft

    model = torch_model(model_dir, None, None)
    config = peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS, init_weights=False)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------- oftjax


def ours_model(model_dir: Path, quant: str | None, adapter: Path | None):
    from interop.hf_model import load_model
    from interop.peft import load_adapter
    from oftjax.train import quantize_model

    model = load_model(model_dir, dtype="float32")
    if quant:
        quantize_model(model, quant, double_quant=True)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


class CompileCounter:
    """Counts XLA backend compilations while active."""

    def __init__(self) -> None:
        import jax

        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, *_args, **_kwargs) -> None:
        if self.active and event == COMPILE_EVENT:
            self.count += 1

    @contextlib.contextmanager
    def counting(self):
        self.count, self.active = 0, True
        try:
            yield self
        finally:
            self.active = False


def ours_generate(model, ids: list[list[int]], new_tokens: int) -> Call:
    from oftjax.generate import SamplingConfig, generate

    result = generate(model, ids, SamplingConfig(max_new_tokens=new_tokens))
    assert all(len(t) == new_tokens for t in result.tokens)
    return Call(result.prefill_seconds, result.decode_tokens_per_s, result.cache_bytes)


# -------------------------------------------------------------------------------------------- transformers


def torch_model(model_dir: Path, quant: str | None, adapter: Path | None):
    """transformers (+ bitsandbytes quantizing on load, + PEFT) in eval mode, float32, default attention."""
    import peft
    import torch
    import transformers

    from interop import oracle

    kwargs = {"dtype": torch.float32, "device_map": "cpu"}
    if quant:
        kwargs["quantization_config"] = oracle.bnb_config(quant, double_quant=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    oracle.disable_cpu_repacking(model)
    model.generation_config.eos_token_id = None  # generate's own falls back to it: no eos stop
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter))
        oracle.disable_cpu_repacking(model)
    return model.eval()


class _Stamps:
    """A logits processor that records when each step's logits arrive and changes nothing."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):  # noqa: ANN001 - transformers' LogitsProcessor signature
        self.times.append(time.perf_counter())
        return scores


def torch_generate(model, ids: list[list[int]], new_tokens: int) -> Call:
    import torch
    import transformers

    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    stamps = _Stamps()
    x = torch.tensor(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            generation_config=config,
            logits_processor=transformers.LogitsProcessorList([stamps]),
        )
        t1 = time.perf_counter()
    assert out.sequences.shape == (len(ids), len(ids[0]) + new_tokens) and len(stamps.times) == new_tokens
    first = stamps.times[0]
    return Call(first - t0, len(ids) * (new_tokens - 1) / (t1 - first), _cache_bytes(out.past_key_values))


def _cache_bytes(cache) -> int:
    """The bytes of a transformers cache's key and value tensors."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(int(t.nbytes) for layer in layers for t in (layer.keys, layer.values) if t is not None)
    return sum(int(k.nbytes) + int(v.nbytes) for k, v in cache)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the real SmolLM2)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default: %(default)s)")
    p.add_argument(
        "--variants", default="float,nf4,nf4+adapter,int8,int8+adapter", help=f"of {','.join(VARIANTS)}"
    )
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="timed calls per side and case (default: %(default)s)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's own)")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",")]
    a.variants = a.variants.split(",")
    if unknown := set(a.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if a.prompt_len <= 9:
        p.error("--prompt-len must be > 9 (the compilation check shortens the prompt by 9)")
    return a


def _case(a, variant: str, adapter: Path, counter: CompileCounter) -> list[str]:
    """Both sides of one variant at every batch size: the Markdown rows."""
    quant, _, with_adapter = variant.partition("+")
    quant = None if quant == "float" else quant
    adapter_dir = adapter if with_adapter else None
    ours = ours_model(a.model, quant, adapter_dir)
    theirs = torch_model(a.model, quant, adapter_dir)
    rows = []
    for batch in a.batches:
        ids = prompts(a.model, batch, a.prompt_len)
        ours_generate(ours, ids, a.new_tokens)  # compiles
        with counter.counting():
            ours_generate(ours, [p[9:] for p in ids], a.new_tokens)
        compiles = counter.count
        torch_generate(theirs, ids, a.new_tokens)  # warm-up
        calls: dict[str, list[Call]] = {"ours": [], "torch": []}
        for _ in range(a.reps):
            calls["ours"].append(ours_generate(ours, ids, a.new_tokens))
            calls["torch"].append(torch_generate(theirs, ids, a.new_tokens))
        rows.append(_row(variant, batch, calls, compiles))
        print(rows[-1], flush=True)
    del ours, theirs
    gc.collect()
    return rows


def _row(variant: str, batch: int, calls: dict[str, list[Call]], compiles: int) -> str:
    med = {
        side: (
            statistics.median(c.decode_tps for c in cs),
            statistics.median(c.ttft for c in cs),
            cs[0].cache_bytes,
        )
        for side, cs in calls.items()
    }
    (o_tps, o_ttft, o_mem), (t_tps, t_ttft, t_mem) = med["ours"], med["torch"]
    return (
        f"| {variant:<13} | {batch:>5} | {o_tps:>8.1f} | {t_tps:>8.1f} | {o_tps / t_tps:>5.2f} | "
        f"{1e3 * o_ttft:>7.0f} | {1e3 * t_ttft:>7.0f} | {t_ttft / o_ttft:>5.2f} | {o_mem / 2**20:>6.1f} | "
        f"{t_mem / 2**20:>6.1f} | {compiles:>8} |"
    )


HEADER = (
    "| variant       | batch | ours tok/s | torch tok/s | ratio | ours TTFT ms | torch TTFT ms | ratio | "
    "ours KV MiB | torch KV MiB | compiles |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from interop.real_model import build_smollm2
    from oftjax import cpu_kernels

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    cpu_kernels.enable()  # as `oftjax generate` on a CPU
    a.model = Path(a.model or build_smollm2())
    counter = CompileCounter()
    load0 = os.getloadavg()[0]
    print(
        f"{a.model}: float32, greedy, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens (no eos stop), "
        f"median of {a.reps}; oftjax with CPU kernels, torch {torch.get_num_threads()} threads"
    )
    print("ratio: oftjax / transformers decode tokens/s, and transformers / oftjax time to first token")
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_adapter(a.model, Path(tmp) / "adapter")
        for variant in a.variants:
            _case(a, variant, adapter, counter)
    print(f"1-min load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
