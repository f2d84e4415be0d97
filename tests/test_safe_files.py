"""Feature files (issue #6): safetensors + JSON only; anything that is not what it claims is refused with a clear
`ValueError`, and no code path unpickles."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cosegment
from cosegment import CoSegmentationFeatures
from cosegment.pipeline_cosegment import FEATURES_FORMAT


def _features(dtype=torch.float32) -> CoSegmentationFeatures:
    g = torch.Generator().manual_seed(0)
    queries = [torch.randn(3, 2, 6, 4, generator=g).to(dtype) for _ in range(2)]
    keys = [torch.randn(3, 2, 6, 4, generator=g).to(dtype) for _ in range(2)]
    return CoSegmentationFeatures(
        queries, keys, (2, 3), [(20, 30), (31, 7), (5, 5)], ["a.attn1#0", "a.attn1#1"], {"timestep": 261, "p": "é"}
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    features = _features(dtype)
    path = tmp_path / "features.safetensors"
    features.save(path)
    loaded = CoSegmentationFeatures.load(path)
    for a, b in zip(features.queries + features.keys, loaded.queries + loaded.keys):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.grid_size == (2, 3) and loaded.image_sizes == [(20, 30), (31, 7), (5, 5)]
    assert loaded.layer_names == features.layer_names and loaded.metadata == features.metadata


def _header(**changes) -> dict[str, str]:
    header = {
        "format": FEATURES_FORMAT,
        "grid_size": "[2, 3]",
        "image_sizes": "[[20, 30], [31, 7]]",
        "layer_names": '["a"]',
        "metadata": "{}",
    }
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


def _tensors(**changes) -> dict[str, torch.Tensor]:
    tensors = {"queries.0": torch.randn(2, 1, 6, 4), "keys.0": torch.randn(2, 1, 6, 4)}
    tensors.update(changes)
    return {k: v for k, v in tensors.items() if v is not None}


def _write(path: Path, kind: str) -> None:
    if kind == "random-bytes":
        path.write_bytes(os.urandom(256))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "json":
        path.write_text(json.dumps({"queries": [[1, 2]], "format": FEATURES_FORMAT}))
    elif kind == "pickle-like":
        path.write_bytes(b"\x80\x04\x95" + os.urandom(64))
    elif kind == "huge-header-length":
        path.write_bytes((2**60).to_bytes(8, "little") + b"{}")
    elif kind == "no-header":
        save_file(_tensors(), str(path))
    elif kind == "other-format":
        save_file(_tensors(), str(path), metadata={"format": "pt"})
    elif kind == "truncated":
        save_file(_tensors(), str(path), metadata=_header())
        path.write_bytes(path.read_bytes()[:-10])
    elif kind == "grid-mismatch":
        save_file(_tensors(), str(path), metadata=_header(grid_size="[3, 3]"))
    elif kind == "sizes-mismatch":
        save_file(_tensors(), str(path), metadata=_header(image_sizes="[[20, 30]]"))
    elif kind == "query-key-mismatch":
        save_file(_tensors(**{"keys.0": torch.randn(2, 3, 6, 4)}), str(path), metadata=_header())
    elif kind == "broken-json":
        save_file(_tensors(), str(path), metadata=_header(grid_size="[2, "))
    elif kind == "grid-not-a-list":
        save_file(_tensors(), str(path), metadata=_header(grid_size="6"))
    elif kind == "missing-field":
        save_file(_tensors(), str(path), metadata=_header(image_sizes=None))
    elif kind == "missing-keys-tensor":
        save_file(_tensors(**{"keys.0": None}), str(path), metadata=_header())
    elif kind == "extra-tensor":
        save_file(_tensors(**{"payload": torch.zeros(1)}), str(path), metadata=_header())
    elif kind == "nan-tensor":
        save_file(_tensors(**{"queries.0": torch.full((2, 1, 6, 4), float("nan"))}), str(path), metadata=_header())
    elif kind == "integer-tensors":
        ints = {"queries.0": torch.zeros(2, 1, 6, 4, dtype=torch.int64), "keys.0": torch.zeros(2, 1, 6, 4).long()}
        save_file(ints, str(path), metadata=_header())
    elif kind == "names-not-strings":
        save_file(_tensors(), str(path), metadata=_header(layer_names="[1]"))
    else:
        raise AssertionError(kind)


BAD_FILES = {
    "random-bytes": "not a safetensors file",
    "empty": "not a safetensors file",
    "json": "not a safetensors file",
    "pickle-like": "not a safetensors file",
    "huge-header-length": "not a safetensors file",
    "no-header": "not a cosegment features file",
    "other-format": "not a cosegment features file",
    "truncated": "safetensors",
    "grid-mismatch": "N=9",
    "sizes-mismatch": "`image_sizes`",
    "query-key-mismatch": "`keys[0]`",
    "broken-json": "damaged",
    "grid-not-a-list": "`grid_size`",
    "missing-field": "image_sizes",
    "missing-keys-tensor": "keys.0",
    "extra-tensor": "payload",
    "nan-tensor": "NaN",
    "integer-tensors": "float",
    "names-not-strings": "`layer_names`",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_file_that_is_not_what_it_claims_is_refused(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    _write(path, kind)
    with pytest.raises(ValueError) as info:
        CoSegmentationFeatures.load(path)
    message = str(info.value)
    assert str(path) in message and BAD_FILES[kind] in message, message


def test_missing_file_and_bad_device(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        CoSegmentationFeatures.load(tmp_path / "nothing.safetensors")
    path = tmp_path / "ok.safetensors"
    _features().save(path)
    with pytest.raises(ValueError, match="`device`"):
        CoSegmentationFeatures.load(path, device="warp-drive")


def test_no_code_path_unpickles():
    """No module of the package (or its tests and scripts) imports pickle or calls a pickle-based loader."""
    root = Path(cosegment.__file__).resolve().parent
    forbidden = re.compile(  # case-insensitive: cPickle
        r"\bimport (c?pickle|dill|joblib)\b|\bfrom (c?pickle|dill|joblib) import|torch\.load\(|torch\.save\("
        r"|allow_pickle\s*=\s*True|np\.load\(|\.from_pickle|pd\.read_pickle",
        re.IGNORECASE,
    )
    for bad in ("import pickle", "from cPickle import loads", "x = torch.load(f)", "np.load(f, allow_pickle=True)"):
        assert forbidden.search(bad), bad
    offenders = []
    for path in root.rglob("*.py"):
        if path.resolve() == Path(__file__).resolve():
            continue
        if any(part.startswith(".") or part in ("build", "dist") for part in path.relative_to(root).parts):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if forbidden.search(line):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, offenders
