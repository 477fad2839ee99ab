"""Data pipeline: reading text trees, tokenizers (byte-level and tokenizer.json), packing, splits, batches."""

import json

import numpy as np
import pytest

from oftjax.data import (
    ByteTokenizer,
    HFTokenizer,
    batch_at,
    load_tokenizer,
    num_batches_per_epoch,
    pack,
    read_texts,
    split,
    tokenize,
)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo → wörld\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258} and tok.vocab_size == 259


def test_pack_rows_and_mask():
    tok = ByteTokenizer()
    docs = tokenize(["abc", "defgh"], tok)
    data = pack(docs, 4, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    stream = [256, 97, 98, 99, 257, 256, 100, 101, 102, 103, 104, 257]
    assert data.input_ids.shape == (3, 4)
    np.testing.assert_array_equal(data.input_ids.ravel(), stream)
    assert data.loss_mask.all()
    odd = pack(docs, 5, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert odd.input_ids.shape == (3, 5)
    np.testing.assert_array_equal(odd.loss_mask.ravel(), [True] * 12 + [False] * 3)
    np.testing.assert_array_equal(odd.input_ids.ravel()[12:], [tok.pad_id] * 3)
    with pytest.raises(ValueError, match="seq_len"):
        pack(docs, 1, bos_id=None, eos_id=None, pad_id=0)


def test_read_texts_recurses_and_skips_binary(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "a.py").write_text("print(1)\n")
    (tmp_path / "b" / "c" / "d.txt").write_text("deep\n")
    (tmp_path / "b" / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "b" / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "y.txt").write_text("cache")
    got = read_texts(tmp_path)
    assert [name for name, _ in got] == ["a.py", "b/c/d.txt"]
    assert read_texts(tmp_path / "a.py") == [("a.py", "print(1)\n")]
    assert sum(len(t) for _, t in read_texts(tmp_path, max_bytes=12)) == 12
    with pytest.raises(ValueError, match="not found"):
        read_texts(tmp_path / "missing")
    with pytest.raises(ValueError, match="no UTF-8 text"):
        read_texts(tmp_path / "b" / "blob.bin")


def test_batches_deterministic_cover_each_epoch():
    data = pack([np.arange(200) % 250], 10, bos_id=None, eos_id=None, pad_id=0)
    assert len(data) == 20 and num_batches_per_epoch(data, 6) == 3
    a = [batch_at(data, s, 6, seed=3)["input_ids"] for s in range(6)]
    b = [batch_at(data, s, 6, seed=3)["input_ids"] for s in range(6)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    first_epoch = np.concatenate([x[:, 0] for x in a[:3]])
    assert len(set(first_epoch.tolist())) == 18  # no row repeats within an epoch
    assert not np.array_equal(a[0], a[3])  # epochs reshuffle
    with pytest.raises(ValueError, match="batch size 30 exceeds"):
        batch_at(data, 0, 30)


def test_split_is_disjoint_and_seeded():
    data = pack([np.arange(300)], 10, bos_id=None, eos_id=None, pad_id=0)
    train, ev = split(data, 0.2, seed=1)
    assert (len(train), len(ev)) == (24, 6)
    rows = {tuple(r) for r in train.input_ids} | {tuple(r) for r in ev.input_ids}
    assert len(rows) == 30
    again, _ = split(data, 0.2, seed=1)
    np.testing.assert_array_equal(again.input_ids, train.input_ids)
    with pytest.raises(ValueError, match="eval_fraction"):
        split(data, 1.0)


def test_tokenizer_json_is_used_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world moon") == [3, 4, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 1, 5)
    assert isinstance(load_tokenizer(tmp_path / "nothing"), ByteTokenizer)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "bad")
