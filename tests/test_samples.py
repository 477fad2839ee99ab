"""``oftjax train`` writes samples.md and samples.jsonl: the base and fine-tuned greedy answers to held-out
prompts (raw text: the first tokens of held-out rows; chat rows: their prompt turns with the generation
prompt), the reference answer, one batch, process 0 only, atomic writes."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import oftjax
from interop.hf_model import load_model, save_model
from interop.peft import load_adapter
from oftjax import cpu_kernels
from oftjax.chat_data import ChatTokenizer, load_chat_data
from oftjax.cli import main
from oftjax.cli._samples import Sample, Samples, identity_rotations, render_markdown
from oftjax.data import ByteTokenizer, split_examples
from oftjax.generate import SamplingConfig, generate
from oftjax.models import LlamaForCausalLM, ModelConfig
from oftjax.train import quantize_model
from tests._real_model import smollm2_dir  # noqa: F401 - the session fixture (its tokenizer and template)

# The default job's shape at test size: a byte-level Llama (ByteTokenizer ids, bos 256, eos 257, pad 258; no
# tokenizer.json), raw text, NF4 + double quantization, OFT.
BYTES = {
    "model_type": "llama", "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
    "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
}  # fmt: skip
CHAT = {**BYTES, "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
CHAT.pop("pad_token_id")
FAST = ["--quiet", "--oft-block-size", "16", "--target-modules", "q_proj,v_proj", "--save-every", "0",
        "--eval-every", "0", "--batch-size", "4", "--steps", "2", "--lr", "0.05"]  # fmt: skip
KEYS = {"source", "prompt", "prompt_ids", "prompt_tokens", "reference", "messages", "base", "fine_tuned",
        "base_tokens", "fine_tuned_tokens"}  # fmt: skip


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "bytes"
    save_model(LlamaForCausalLM(ModelConfig.from_hf(BYTES), rngs=nnx.Rngs(0)), path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "text.txt"
    words = "orthogonal rotations keep the norms of the hidden features while the model learns ".split()
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, 3000)))
    return path


@pytest.fixture(scope="module")
def text_run(byte_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    argv = ["train", "--model", str(byte_dir), "--data", str(text_file), "--output", str(out), *FAST]
    assert main([*argv, "--seq-len", "64"]) == 0
    return out


def _records(run):
    return [json.loads(line) for line in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def _greedy(model, prompts, tokens, eos):
    with cpu_kernels.enable():  # what the run used on a CPU (--cpu-kernels defaults to on)
        return generate(model, prompts, SamplingConfig(tokens, eos_token_ids=eos, pad_token_id=0)).tokens


def test_a_text_run_writes_base_and_fine_tuned_answers_to_held_out_prompts(text_run, byte_dir):
    records = _records(text_run)
    assert len(records) == 4 and all(set(r) == KEYS for r in records)
    tok = ByteTokenizer()
    prompts = [r["prompt_ids"] for r in records]
    assert [len(p) for p in prompts] == [r["prompt_tokens"] for r in records] == [32] * 4  # half of 64
    for r in records:
        assert r["prompt"] == tok.decode(r["prompt_ids"])
        assert r["source"].startswith("held-out row ") and r["messages"] is None
        assert len(r["reference"]) == 32  # the rest of the row
        assert r["base_tokens"] == r["fine_tuned_tokens"] == 48  # no eos from these models
    # the fine-tuned answers are the trained adapter's; the base ones the quantized base's (identity
    # rotations: the disabled adapters, as the test below shows)
    model = load_model(byte_dir, dtype="float32")
    quantize_model(model, "nf4", double_quant=True)
    load_adapter(model, text_run / "adapter")
    tuned = _greedy(model, prompts, 48, (257,))
    with identity_rotations(model):
        base = _greedy(model, prompts, 48, (257,))
    assert [r["base"] for r in records] == [tok.decode(t) for t in base]
    assert [r["fine_tuned"] for r in records] == [tok.decode(t) for t in tuned]
    assert base != tuned  # the rotations trained (lr 0.05): the answers moved
    md = (text_run / "samples.md").read_text(encoding="utf-8")
    for i, r in enumerate(records, 1):
        section = md.split(f"## {i}. {r['source']}\n")[1].split("\n## ")[0]
        assert [line for line in section.splitlines() if line.endswith(":")] == [
            "prompt:", "base:", "fine-tuned:", "reference:"
        ]  # fmt: skip
        assert r["fine_tuned"] in section and r["reference"] in section


def test_samples_zero_writes_none_and_the_option_is_checked(byte_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", str(byte_dir), "--data", str(text_file), "--output", str(out), *FAST]
    assert main([*argv, "--seq-len", "32", "--steps", "1", "--samples", "0"]) == 0
    assert not (out / "samples.md").exists() and not (out / "samples.jsonl").exists()
    for flag, value in (("--samples", "-1"), ("--sample-tokens", "0")):
        assert main([*argv, "--force", flag, value]) == 1
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, smollm2_dir):  # noqa: F811
    """A tiny Llama with SmolLM2's tokenizer files and chat template."""
    path = tmp_path_factory.mktemp("samples") / "chat"
    save_model(LlamaForCausalLM(ModelConfig.from_hf(CHAT), rngs=nnx.Rngs(0)), path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


def _chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{2 * i}."},
            {"role": "user", "content": f"And {i} plus one?"},
            {"role": "assistant", "content": f"{i + 1}."},
        ]
    }


def _chat_files(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(40)))
    evald = tmp_path / "eval.jsonl"
    evald.write_text(json.dumps({"prompt": "Name a colour.", "completion": "Blue."}) + "\n")
    with open(evald, "a") as f:
        f.write("".join(json.dumps(_chat(i)) + "\n" for i in range(100, 110)))
    return data, evald


def test_a_chat_run_answers_the_held_out_prompt_turns(chat_dir, smollm2_dir, tmp_path):  # noqa: F811
    import transformers

    data, evald = _chat_files(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--model", str(chat_dir), "--data", str(data), "--output", str(out), *FAST]
    argv += ["--eval-data", str(evald), "--seq-len", "96", "--samples", "3", "--sample-tokens", "6"]
    assert main(argv) == 0
    records = _records(out)
    rows = [json.loads(line) for line in evald.read_text().splitlines()][:3]
    assert [r["source"] for r in records] == [f"{evald}:{i}" for i in (1, 2, 3)]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    for record, row in zip(records, rows, strict=True):
        messages = row["messages"][:-1] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
        reference = row["messages"][-1]["content"] if "messages" in row else row["completion"]
        want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert record["prompt_ids"] == list(want) and record["reference"] == reference
        assert record["messages"] == messages
        assert 1 <= record["base_tokens"] <= 6 and 1 <= record["fine_tuned_tokens"] <= 6
    md = (out / "samples.md").read_text(encoding="utf-8")
    assert md.count("\nreference:\n") == 3 and md.count("\nfine-tuned:\n") == 3
    assert "\nuser: " + records[-1]["messages"][-1]["content"] + "\n" in md


def test_without_eval_data_the_prompts_are_the_rows_training_holds_out(chat_dir, tmp_path):
    from argparse import Namespace

    from oftjax.cli._samples import _held_out_rows
    from oftjax.cli._train_data import TrainData

    data, _ = _chat_files(tmp_path)
    args = Namespace(
        samples=3, seq_len=96, loss_on="assistant", skip_bad_rows=False, eval_fraction=0.25, seed=0
    )
    tok = ChatTokenizer.from_checkpoint(chat_dir)
    rows = _held_out_rows(args, TrainData(None, None, rows=data), tok)
    _, held = split_examples(load_chat_data(data, tok, seq_len=96).examples, 0.25, seed=0)
    assert [r.source for r in rows] == [e.source for e in held[:3]]


def test_base_answers_with_identity_rotations_are_the_disabled_adapters_and_compile_once():
    from oftjax.generate import _decode

    cfg = ModelConfig.from_hf({**BYTES, "head_dim": 16})
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    quantize_model(model, "nf4")
    oft = oftjax.OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj"], init_weights=False)
    oftjax.apply_oft(model, oft, rngs=nnx.Rngs(1))
    prompts = [[256, 5, 17, 3], [256, 99]]
    sampling = SamplingConfig(6)
    adapted = generate(model, prompts, sampling, chunk=4, bucket=8).tokens
    size = _decode._prefill._cache_size()
    before = [np.asarray(p) for p in jax.tree.leaves(nnx.state(model, oftjax.OFTParam))]
    with identity_rotations(model):
        base = generate(model, prompts, sampling, chunk=4, bucket=8).tokens
    assert _decode._prefill._cache_size() == size  # the adapted model's compiled prefill ran it
    after = [np.asarray(p) for p in jax.tree.leaves(nnx.state(model, oftjax.OFTParam))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    with oftjax.disable_adapters(model):
        assert generate(model, prompts, sampling, chunk=4, bucket=8).tokens == base
    assert base != adapted


def test_only_process_0_writes_and_markdown_fences_hold_any_text(tmp_path, monkeypatch):
    import oftjax.train as train

    sample = Sample("a.jsonl:3", [1, 2], "user: show a fence", "~~~\ninside\n~~~~", base="x", fine_tuned="y")
    samples = Samples([sample], ByteTokenizer(), SamplingConfig(4), tmp_path, "rows", lambda msg: None)
    monkeypatch.setattr(train, "is_primary", lambda: False)
    samples.write()
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    samples.write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl", "samples.md"]
    md = render_markdown([sample], 4, "rows")
    assert "reference:\n\n~~~~~text\n~~~\ninside\n~~~~\n~~~~~\n" in md
    assert json.loads((tmp_path / "samples.jsonl").read_text())["reference"] == "~~~\ninside\n~~~~"


@pytest.mark.slow
def test_the_default_job_writes_samples_of_the_documentation_text(tmp_path):
    """``oftjax train`` with no model: the embedded base pretrained briefly, the documentation slice held
    out; its byte-level answers decoded for display."""
    out = tmp_path / "run"
    argv = ["train", "--output", str(out), "--quiet", "--pretrain-steps", "3", "--steps", "3",
            "--max-data-bytes", "300000", "--batch-size", "4", "--eval-every", "0"]  # fmt: skip
    assert main(argv) == 0
    records = _records(out)
    assert len(records) == 4 and all(set(r) == KEYS for r in records)
    assert all(r["prompt_tokens"] == 48 and len(r["reference"].encode()) >= 40 for r in records)
    assert (out / "samples.md").read_text(encoding="utf-8").count("\nfine-tuned:\n") == 4
