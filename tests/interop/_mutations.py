"""Mutations of valid checkpoint and adapter directories for the fuzz test (tests/test_fuzz.py).

``mutate(rng, root, bait)`` applies one random mutation to the directory ``root`` (a copy of a valid fixture)
and returns what it did, in one line. The mutations are hostile, not random noise: values of the wrong type,
out of range or non-finite in every JSON file (config.json, adapter_config.json, index files, the oftjax
metadata, the quant_state JSON inside a bnb checkpoint), damaged JSON text, safetensors headers with other
dtypes, shapes, offsets and names, truncated or extended files, and files replaced by FIFOs, directories,
links leaving the directory (to ``bait``: files a loader must never read) or deleted. Tensor bytes are never
changed: a different number in a weight is a different valid checkpoint, not a hostile one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**70, -(2**70), 1e308, -1e308, math.nan, math.inf, -math.inf, 0.5, "",
    "x", "../../outside", "(.*)*Z", "(", [], [1], ["a", 2], {}, {"a": 1}, [[[[]]]],
]  # fmt: skip


class Skip(Exception):
    """The mutation does not apply to this directory (e.g. no JSON file): draw another."""


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.name.endswith(suffixes)
    )


def _pick(rng: random.Random, items: list) -> Any:
    if not items:
        raise Skip
    return items[rng.randrange(len(items))]


def _json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON tree (dict keys and list indices), parents before children."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out += _json_paths(child, (*prefix, key))
    return out


def _variants(value: Any, rng: random.Random) -> Any:
    """A hostile replacement for ``value``: the same number as another type, or a value of another kind."""
    same = []
    if isinstance(value, bool):
        same = [int(value), str(value).lower()]
    elif isinstance(value, int):
        same = [float(value), str(value), -value, value + 1, value * 2**40]
    elif isinstance(value, float):
        same = [str(value), -value, value * 1e300, int(value) if math.isfinite(value) else 0]
    elif isinstance(value, str):
        same = [value.upper(), value + "x", [value], value * 2]
    elif isinstance(value, list):
        same = [value[:1], value * 2, {"0": value}, str(value)]
    return _pick(rng, same + HOSTILE_VALUES)


def _edit_json_tree(rng: random.Random, data: Any) -> tuple[Any, str]:
    paths = _json_paths(data)
    op = rng.choice(["value", "value", "value", "delete", "add"])
    if op == "add" or not paths:
        parents = [()] + [p for p in paths if isinstance(_get(data, p), dict)]
        parent = _pick(rng, parents)
        _get(data, parent)["fuzz_unknown_key"] = _pick(rng, HOSTILE_VALUES)
        return data, f"add key fuzz_unknown_key at {list(parent)}"
    path = _pick(rng, paths)
    parent, key = _get(data, path[:-1]), path[-1]
    if op == "delete":
        del parent[key]
        return data, f"delete {list(path)}"
    new = _variants(parent[key], rng)
    parent[key] = new
    return data, f"set {list(path)} = {new!r:.60}"


def _get(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def json_value(rng: random.Random, root: Path, bait: list[Path]) -> str:
    path = _pick(rng, _files(root, (".json",)))
    data, what = _edit_json_tree(rng, json.loads(path.read_text()))
    path.write_text(json.dumps(data))
    return f"{path.relative_to(root)}: {what}"


def json_text(rng: random.Random, root: Path, bait: list[Path]) -> str:
    path = _pick(rng, _files(root, (".json",)))
    text = path.read_text()
    op = rng.choice(["truncate", "byte", "deep", "empty", "array", "long-number", "duplicate", "nan"])
    if op == "truncate":
        text = text[: rng.randrange(len(text))]
    elif op == "byte":
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(['"', "{", "]", ",", "\x00", "\\", "\udcff"]) + text[i + 1 :]
    elif op == "deep":
        text = '{"a": ' * 50_000 + "1" + "}" * 50_000
    elif op == "empty":
        text = ""
    elif op == "array":
        text = "[" + text + "]"
    elif op == "long-number":
        text = text.replace(":", ": 1" + "0" * 5000 + ', "x":', 1)
    elif op == "duplicate":
        key = _pick(rng, list(json.loads(text))) if text.lstrip().startswith("{") else "x"
        text = text.replace("{", "{" + json.dumps(key) + ": null, ", 1)
    else:
        text = text.replace(": ", ': NaN, "y": ', 1)
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    return f"{path.relative_to(root)}: {op}"


def _read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def st_header(rng: random.Random, root: Path, bait: list[Path]) -> str:
    path = _pick(rng, _files(root, (".safetensors",)))
    header, body = _read_header(path)
    names = [k for k in header if k != "__metadata__"]
    key = _pick(rng, names)
    entry = header[key]
    op = rng.choice(["dtype", "shape", "shape", "offsets", "rename", "delete", "add", "metadata", "entry"])
    if op == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I32", "I64", "F64", "BOOL", "Q4", 5])
    elif op == "shape":
        entry["shape"] = rng.choice(
            [entry["shape"][::-1], [*entry["shape"], 1], entry["shape"][:-1], [2**32, 2**32], [-1, 2],
             [float(s) for s in entry["shape"]], [0], "64", None, [math.prod(entry["shape"])]]
        )  # fmt: skip
    elif op == "offsets":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[b + 1, e + 1], [b, e - 1], [e, b], [b, 2**63], [-8, e], [b], None]
        )
    elif op == "rename":
        header[rng.choice([key + "x", _pick(rng, names), "", "__metadata__x", "a" * 300])] = header.pop(key)
    elif op == "delete":
        del header[key]
    elif op == "add":
        header["model.fuzz.weight"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    elif op == "metadata":
        header["__metadata__"] = _pick(rng, [{"format": 5}, [1], "pt", {"format": None}, {}])
    else:
        header[key] = _variants(entry, rng)
    _write_header(path, header, body)
    return f"{path.relative_to(root)}: header {op} of {key!r:.60}"


def st_bytes(rng: random.Random, root: Path, bait: list[Path]) -> str:
    path = _pick(rng, _files(root, (".safetensors",)))
    data = path.read_bytes()
    op = rng.choice(["truncate", "append", "length", "length-huge", "empty", "header-only"])
    if op == "truncate":
        data = data[: rng.randrange(len(data))]
    elif op == "append":
        data += b"\x00" * rng.choice([1, 8, 4096])
    elif op == "length":
        (n,) = struct.unpack("<Q", data[:8])
        data = struct.pack("<Q", n + rng.choice([-8, -1, 1, 8])) + data[8:]
    elif op == "length-huge":
        data = struct.pack("<Q", rng.choice([2**63, 2**64 - 1, 10**9])) + data[8:]
    elif op == "empty":
        data = b""
    else:
        (n,) = struct.unpack("<Q", data[:8])
        data = data[: 8 + n]
    path.write_bytes(data)
    return f"{path.relative_to(root)}: bytes {op}"


def quant_state(rng: random.Random, root: Path, bait: list[Path]) -> str:
    """Mutate the quant_state JSON stored as a uint8 tensor (bnb 4-bit checkpoints)."""
    path = _pick(rng, _files(root, (".safetensors",)))
    header, body = _read_header(path)
    keys = [k for k in header if ".quant_state.bitsandbytes__" in k]
    key = _pick(rng, keys)
    b, e = header[key]["data_offsets"]
    qs = json.loads(body[b:e])
    qs, what = _edit_json_tree(rng, qs)
    blob = json.dumps(qs).encode()
    # the blob changes length: move every later tensor (offsets are contiguous)
    delta = len(blob) - (e - b)
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        if entry["data_offsets"][0] >= e:
            entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]
    header[key]["shape"] = [len(blob)]
    header[key]["data_offsets"] = [b, b + len(blob)]
    _write_header(path, header, body[:b] + blob + body[e:])
    return f"{path.relative_to(root)}: quant_state {key.rsplit('.', 3)[0]}: {what}"


def fs(rng: random.Random, root: Path, bait: list[Path]) -> str:
    """A file replaced by something else: a FIFO, a directory, a link (outside, inside), or nothing."""
    path = _pick(rng, _files(root, (".json", ".safetensors")))
    op = rng.choice(["fifo", "dir", "link-bait", "link-inside", "delete", "dev-zero"])
    path.unlink()
    if op == "fifo":
        os.mkfifo(path)
    elif op == "dir":
        path.mkdir()
    elif op == "link-bait":
        os.symlink(_pick(rng, bait), path)
    elif op == "link-inside":
        os.symlink(_pick(rng, [p.name for p in path.parent.iterdir() if p.is_file()] or ["x"]), path)
    elif op == "dev-zero":
        os.symlink("/dev/zero", path)
    return f"{path.relative_to(root)}: replaced by {op}"


def fs_extra(rng: random.Random, root: Path, bait: list[Path]) -> str:
    """Something added beside the files: a linked or special extra file, a linked subfolder, an index entry
    naming a file outside."""
    op = rng.choice(["extra-link", "extra-fifo", "subfolder-link", "index-outside"])
    if op == "extra-link":
        os.symlink(_pick(rng, bait), root / "tokenizer.json")
    elif op == "extra-fifo":
        os.mkfifo(root / "generation_config.json")
    elif op == "subfolder-link":
        os.symlink(_pick(rng, bait).parent, root / "linked")
    else:
        index = _pick(rng, _files(root, (".index.json",)))
        data = json.loads(index.read_text())
        key = _pick(rng, sorted(data["weight_map"]))
        targets = ["../outside/secret.safetensors", str(bait[0]), "missing.safetensors", "a/../b.safetensors"]
        data["weight_map"][key] = rng.choice([*targets, "/dev/zero"])
        index.write_text(json.dumps(data))
        return f"{index.relative_to(root)}: weight_map[{key!r}] = {data['weight_map'][key]!r}"
    return op


OPERATORS = [
    json_value,
    json_value,
    json_value,
    json_text,
    st_header,
    st_header,
    st_bytes,
    quant_state,
    fs,
    fs_extra,
]


def mutate(rng: random.Random, root: Path, bait: list[Path]) -> str:
    """Apply one mutation to ``root`` (drawing again when one does not apply) and describe it."""
    for _ in range(100):
        op = rng.choice(OPERATORS)
        try:
            return f"{op.__name__}: {op(rng, root, bait)}"
        except Skip:
            continue
    raise RuntimeError(f"no mutation applies to {root}")


def copy_fixture(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
