import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import jaxq
from bridge.weights_only import (
    CheckpointError,
    WeightOnlyConfig,
    dequantize,
    open_checkpoint,
    quantize_checkpoint,
    read_rows,
)
from bridge.weights_only import quantize as wq


def _checkpoint(tmp_path, sharded=False, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(50, 64, generator=g).to(dtype),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(256, 64, generator=g).to(dtype),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 256, generator=g).to(dtype),
        "model.layers.0.input_layernorm.weight": torch.randn(64, generator=g).to(dtype),
        "model.conv.weight": torch.randn(8, 4, 3, 3, generator=g).to(dtype),
    }
    if not sharded:
        save_file(tensors, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors", tensors
    names = list(tensors)
    save_file({k: tensors[k] for k in names[:3]}, tmp_path / "a.safetensors")
    save_file({k: tensors[k] for k in names[3:]}, tmp_path / "b.safetensors")
    index = {"weight_map": {k: "a.safetensors" if i < 3 else "b.safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path / "model.safetensors.index.json", tensors


def _load_out(out):
    index = json.loads((out / wq.INDEX).read_text())
    merged = {}
    for shard in set(index["weight_map"].values()):
        merged.update(load_file(out / shard))
    assert set(merged) == set(index["weight_map"])
    return merged


def test_bf16_rows_are_read_exactly(tmp_path):
    path, tensors = _checkpoint(tmp_path)
    info = open_checkpoint(path)["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(read_rows(info, 10, 20), tensors[info.name][10:20].float().numpy())


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("sharded", [False, True])
def test_rtn_equals_jaxq_per_row_and_everything_else_is_copied(tmp_path, group_size, sharded):
    path, tensors = _checkpoint(tmp_path, sharded)
    out = tmp_path / "out"
    exclude = ("*embed*", "*norm*") + (("*conv*",) if group_size else ())  # 36 values per conv channel
    desc = quantize_checkpoint(
        path, out, bits=4, group_size=group_size, shard_size_mib=1, progress=False, exclude=exclude
    )
    got = _load_out(out)
    for name, t in tensors.items():
        if desc[name] == "FLOAT":
            assert torch.equal(got[name], t) and got[name].dtype == t.dtype
            continue
        w = t.float().numpy()
        rows = w.reshape(-1, group_size or int(np.prod(w.shape[1:])))
        ref = jaxq.quantize_weight(rows, jaxq.QScheme(bits=4, axis=0))
        np.testing.assert_array_equal(got[name].numpy().reshape(rows.shape), np.asarray(ref.q))
        np.testing.assert_array_equal(got[f"{name}_scale"].numpy().reshape(-1), np.asarray(ref.qparams.scale))
        assert got[name].dtype == torch.int8 and got[name].abs().max() <= 8
        w_hat = dequantize(got[name].numpy(), got[f"{name}_scale"].numpy(), got[f"{name}_offset"].numpy())
        assert np.abs(w_hat - w).max() <= np.asarray(ref.qparams.scale).max() / 2 + 1e-6
    assert desc["model.embed_tokens.weight"] == "FLOAT" and desc["model.layers.0.input_layernorm.weight"] == "FLOAT"
    assert desc["model.layers.0.mlp.down_proj.weight"] == "W4"
    assert desc["model.conv.weight"] == ("FLOAT" if group_size else "W4")


def test_small_memory_budget_gives_the_same_bytes(tmp_path, monkeypatch):
    path, _ = _checkpoint(tmp_path)
    quantize_checkpoint(
        path, tmp_path / "big", bits=4, group_size=None, progress=False, exclude=("*embed*", "*norm*", "*conv*")
    )
    monkeypatch.setattr(wq, "CHUNK_ROWS", 8)
    quantize_checkpoint(
        path,
        tmp_path / "small",
        bits=4,
        group_size=None,
        progress=False,
        memory_budget_mib=16,
        exclude=("*embed*", "*norm*", "*conv*"),
    )
    a, b = _load_out(tmp_path / "big"), _load_out(tmp_path / "small")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["admm", "squant"])
def test_other_methods_lower_or_keep_the_error_and_stay_on_the_grid(tmp_path, method):
    path, tensors = _checkpoint(tmp_path, dtype=torch.float32)
    quantize_checkpoint(
        path, tmp_path / "rtn", bits=3, group_size=32, progress=False, exclude=("*embed*", "*norm*", "*conv*")
    )
    quantize_checkpoint(
        path,
        tmp_path / method,
        bits=3,
        group_size=32,
        method=method,
        iters=20,
        progress=False,
        exclude=("*embed*", "*norm*", "*conv*"),
    )
    rtn, other = _load_out(tmp_path / "rtn"), _load_out(tmp_path / method)
    name = "model.layers.0.mlp.up_proj.weight"
    w = tensors[name].numpy()
    err = lambda o: np.mean(
        (dequantize(o[name].numpy(), o[f"{name}_scale"].numpy(), o[f"{name}_offset"].numpy()) - w) ** 2
    )  # noqa: E731
    assert other[name].min() >= -4 and other[name].max() <= 3
    if method == "admm":
        assert err(other) <= err(rtn)
    else:
        assert not torch.equal(other[name], rtn[name])


RESUME_OPTS = dict(bits=4, group_size=32, exclude=("*embed*", "*norm*", "*conv*"), progress=False)


def _interrupted_run(path, out, monkeypatch):
    """A shard per tensor, killed while quantizing the third; returns the real `_quantize_into`."""
    real_plan = wq.plan
    monkeypatch.setattr(wq, "plan", lambda t, c: [[item] for shard in real_plan(t, c) for item in shard])
    real = wq._quantize_into
    calls = {"n": 0}

    def dies_on_the_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(wq, "_quantize_into", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(path, out, **RESUME_OPTS)
    return real


def test_interrupted_run_resumes_to_the_same_files(tmp_path, monkeypatch):
    path, _ = _checkpoint(tmp_path, sharded=True)
    opts = RESUME_OPTS
    out = tmp_path / "resumed"
    monkeypatch.setattr(wq, "_quantize_into", _interrupted_run(path, out, monkeypatch))
    quantize_checkpoint(path, tmp_path / "clean", **opts)  # the same plan (a shard per tensor), uninterrupted
    state = json.loads((out / wq.PROGRESS).read_text())
    assert len(state["done"]) >= 2 and not list(out.glob("*.partial")) and not (out / wq.INDEX).exists()
    with pytest.raises(CheckpointError, match="another checkpoint or other options"):
        quantize_checkpoint(path, out, **{**opts, "bits": 8})
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    quantize_checkpoint(path, out, **opts)
    assert all((out / n).stat().st_mtime_ns == t for n, t in finished.items())  # finished shards were not redone
    a, b = _load_out(tmp_path / "clean"), _load_out(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / wq.PROGRESS).exists()
    with pytest.raises(CheckpointError, match="already holds a quantized checkpoint"):
        quantize_checkpoint(path, out, **opts)


def test_bad_options_and_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="bits=9"):
        WeightOnlyConfig(bits=9)
    with pytest.raises(ValueError, match="method='gptq'"):
        WeightOnlyConfig(method="gptq")
    path, _ = _checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.\S+' \[.*group_size=48 does not divide.*exclude it"):
        quantize_checkpoint(path, tmp_path / "o", group_size=48, progress=False)
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_command_line(tmp_path, capsys):
    from bridge.cli.main import main

    path, _ = _checkpoint(tmp_path)
    assert (
        main(
            [
                "quantize-weights",
                str(path),
                "--out",
                str(tmp_path / "o"),
                "--bits",
                "4",
                "--group-size",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "4 tensors quantized to W4 (rtn, per channel)" in capsys.readouterr().out
    assert main(["quantize-weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_after_the_source_was_rewritten_in_place_quantizes_the_new_values(tmp_path, monkeypatch):
    path, tensors = _checkpoint(tmp_path, sharded=True)
    opts = RESUME_OPTS
    out = tmp_path / "out"
    monkeypatch.setattr(wq, "_quantize_into", _interrupted_run(path, out, monkeypatch))
    # same names, shapes and file sizes, other values
    rewritten = {k: (-v if v.dim() >= 2 else v) for k, v in tensors.items()}
    names = list(rewritten)
    save_file({k: rewritten[k] for k in names[:3]}, tmp_path / "a.safetensors")
    save_file({k: rewritten[k] for k in names[3:]}, tmp_path / "b.safetensors")
    with pytest.warns(UserWarning, match="changed since it was written"):
        quantize_checkpoint(path, out, **opts)
    fresh = tmp_path / "fresh"
    quantize_checkpoint(path, fresh, **opts)
    a, b = _load_out(fresh), _load_out(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickle_and_corrupt_headers_name_the_file(tmp_path):
    torch.save({"w": torch.randn(4, 4)}, tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match=r"p.safetensors.*pickle"):
        quantize_checkpoint(tmp_path / "p.safetensors", tmp_path / "o", progress=False)
    import struct

    header = json.dumps({"w": {"dtype": "F32"}}).encode()
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"c.safetensors.*tensor 'w'.*corrupt"):
        quantize_checkpoint(tmp_path / "c.safetensors", tmp_path / "o2", progress=False)


def test_a_header_length_ending_in_byte_0x80_is_safetensors_not_pickle(tmp_path):
    """The first byte of the little-endian header length may be 0x80, like pickle's magic."""
    import json
    import struct

    from bridge.weights_only.safetensors_io import read_header

    data = np.arange(4, dtype=np.float32).tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * ((128 - len(header)) % 256)
    assert len(header) % 256 == 128
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    assert read_header(tmp_path / "m.safetensors")["w"].shape == (4,)
