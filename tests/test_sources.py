"""Checkpoint readers on real files: HF save_pretrained dirs, shards, run dirs, fused Phi-3 weights,
and every kind of broken input the CLI must explain in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from geometry.errors import GeometryError
from geometry.offline import sources
from geometry.offline.analyze import Run, analyze
from geometry.offline.matrices import MatrixSpec, read_matrix, select_matrices
from geometry.offline.sources import Checkpoint, TensorSource, open_run, open_source, same_tensors

TINY = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=64,
            num_attention_heads=4, num_key_value_heads=2)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _raises(match: str):
    """GeometryError whose message matches and is one line (the CLI prints it as is)."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(GeometryError, match=match)
            self.info = self.ctx.__enter__()

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert "\n" not in str(self.info.value)
            return handled
    return _Check()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny Llama saved single-file; returns its dir and state dict."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    d = tmp_path_factory.mktemp("llama") / "base"
    model.save_pretrained(d)
    model.save_pretrained(d.parent / "sharded", max_shard_size="20KB")
    return d, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write(d: Path, tensors: dict, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


# ---- opening models ---------------------------------------------------------------------------

def test_single_dir_reads_every_tensor_as_stored(llama):
    d, sd = llama
    src = open_source(d)
    assert src.label == str(d) and src.config["hidden_size"] == 32
    assert set(src.names()) == set(sd) and "model.layers.0.self_attn.q_proj.weight" in src
    for name, t in sd.items():
        assert src.shape(name) == tuple(t.shape) and src.dtype(name) == t.dtype
        assert torch.equal(src.read(name), t)
    with _raises("no tensor named nope"):
        src.read("nope")


def test_sharded_dir_matches_single(llama):
    d, sd = llama
    sharded = d.parent / "sharded"
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    src = open_source(sharded)
    assert set(src.names()) == set(sd)
    assert all(torch.equal(src.read(n), sd[n]) for n in sd)


def test_sharded_index_naming_missing_shard(llama, tmp_path):
    d = shutil.copytree(llama[0].parent / "sharded", tmp_path / "m")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with _raises("model-00002-of-"):
        open_source(d)


def test_names_are_in_natural_layer_order(tmp_path):
    src = open_source(_write(tmp_path / "m", {f"layers.{i}.w.weight": torch.zeros(2, 2) for i in (10, 2, 1)}))
    assert src.names() == ["layers.1.w.weight", "layers.2.w.weight", "layers.10.w.weight"]


def test_bare_file_bf16_and_row_reads(tmp_path):
    w = torch.randn(6, 4).to(torch.bfloat16)
    f = tmp_path / "w.safetensors"
    save_file({"a.weight": w}, str(f))
    src = open_source(f)
    assert src.config is None and src.dtype("a.weight") == torch.bfloat16
    assert torch.equal(src.read("a.weight"), w) and torch.equal(src.read("a.weight", slice(2, 5)), w[2:5])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_reads_equal_the_safetensors_library_and_map_nothing(tmp_path, dtype):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(3)
    tensors = {"a.weight": torch.randn(7, 5, generator=g).to(dtype),
               "b.weight": torch.randn(3, 9, generator=g).to(dtype), "bias": torch.randn(4, generator=g).to(dtype)}
    f = tmp_path / "m.safetensors"
    save_file(tensors, str(f))
    src = open_source(f)
    with safe_open(str(f), framework="pt") as lib:
        for name in tensors:
            assert torch.equal(src.read(name), lib.get_tensor(name)), name
        for rows in (slice(0, 7), slice(2, 5), slice(6, 9), slice(4, 4), slice(1, None, 2)):
            assert torch.equal(src.read("a.weight", rows), lib.get_slice("a.weight")[rows]), rows
    maps = Path("/proc/self/maps")
    if maps.exists():  # nothing of the file stays mapped once read
        assert str(f) not in maps.read_text()


def test_a_file_cut_after_it_was_opened_is_one_line_error(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(64, 64)}, str(f))
    src = open_source(f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])  # the tensor loses its tail: a short read, not a fault
    with pytest.raises(GeometryError, match="truncated"):
        src.read("a.weight")
    assert torch.equal(src.read("a.weight", slice(0, 10)), torch.frombuffer(bytearray(data[-64 * 64 * 4:]),
                                                                        dtype=torch.float32).view(64, 64)[:10])


def test_long_reads_in_several_parts(tmp_path, monkeypatch):
    # Linux returns at most ~2 GiB a read: the reader goes on from where a short read stopped
    import os

    f = tmp_path / "m.safetensors"
    w = torch.randn(50, 40)
    save_file({"a.weight": w}, str(f))
    src = open_source(f)
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:1000]], off))
    assert torch.equal(src.read("a.weight"), w)


@pytest.mark.parametrize("cut", ["tail", "header", "garbage", "empty"])
def test_corrupt_safetensors_is_one_line_error(llama, tmp_path, cut):
    data = (llama[0] / "model.safetensors").read_bytes()
    broken = {"tail": data[:-100], "header": data[:20], "garbage": b"not a safetensors file" * 20,
              "empty": b""}[cut]
    f = tmp_path / "model.safetensors"
    f.write_bytes(broken)
    with _raises(str(f)):
        open_source(f)
    with _raises(str(f)):
        open_source(tmp_path)


def test_missing_path_and_empty_dir(tmp_path):
    with _raises("no such file"):
        open_source(tmp_path / "nope")
    with _raises("no such file"):
        open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with _raises("no model weights"):
        open_source(tmp_path / "empty")
    with _raises("no checkpoint-N folders"):
        open_run(tmp_path / "empty")


class _Payload:
    """Anything that is not plain tensors: weights_only=True must refuse to build it."""


def test_pickle_refused_unless_opted_in(llama, tmp_path):
    sd = llama[1]
    d = tmp_path / "binmodel"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    for target in (d, d / "pytorch_model.bin"):
        with _raises("--allow-pickle"):
            open_source(target)
    with _raises("--allow-pickle"):
        open_run(d)
    src = open_source(d, allow_pickle=True)
    assert set(src.names()) == set(sd) and all(torch.equal(src.read(n), sd[n]) for n in sd)
    # Opted in, it still never runs arbitrary pickles.
    torch.save({"x": _Payload()}, tmp_path / "evil.bin")
    with _raises("evil.bin"):
        open_source(tmp_path / "evil.bin", allow_pickle=True)


def test_safetensors_preferred_over_pickle(llama, tmp_path):
    d = shutil.copytree(llama[0], tmp_path / "m")
    torch.save({"x": _Payload()}, d / "pytorch_model.bin")
    torch.save({"x": _Payload()}, d / "training_args.bin")
    assert set(open_source(d).names()) == set(llama[1])


# ---- runs ----------------------------------------------------------------------------------------

def test_run_dir_numeric_order_ignores_unfinished(llama, tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-100", ".tmp-checkpoint-5", "checkpoint-7.tmp"):
        shutil.copytree(llama[0], run / name)
    (run / "runs").mkdir()  # Trainer's tensorboard folder
    ckpts = open_run(run)
    assert [c.step for c in ckpts] == [2, 10, 100]
    assert all(isinstance(c, Checkpoint) and isinstance(c.source, TensorSource) for c in ckpts)
    assert ckpts[0].source.label == str(run / "checkpoint-2")


def test_single_model_step_only_where_training_wrote_one(llama, tmp_path):
    """checkpoint-N (folder or file) or trainer_state.json's global_step; a name like phi-2 is not step 2."""
    f = tmp_path / "checkpoint-7.safetensors"
    shutil.copy(llama[0] / "model.safetensors", f)
    [ck] = open_run(f)
    assert ck.step == 7 and ck.source.label == str(f) and ck.label == "checkpoint-7"
    cases = (("phi-2", None), ("step_300", None), ("ckpt-7", None), ("final", 42), ("checkpoint-12", 12))
    for name, step in cases:
        d = shutil.copytree(llama[0], tmp_path / "m" / name)
        if name == "final":
            (d / "trainer_state.json").write_text(json.dumps({"global_step": 42, "log_history": []}))
        [ck] = open_run(d)
        assert (ck.step, ck.label) == (step, name)
        [ck] = open_run(d / "model.safetensors")  # a file called model.* is named after its folder
        assert (ck.step, ck.label) == (step, name)
    (tmp_path / "m" / "final" / "trainer_state.json").write_text(json.dumps({"global_step": "x"}))
    with _raises("global_step is 'x'"):
        open_run(tmp_path / "m" / "final")
    (tmp_path / "m" / "final" / "trainer_state.json").write_text("[1, 2]")
    with _raises("expected a JSON object"):
        open_run(tmp_path / "m" / "final")


# ---- selecting matrices ---------------------------------------------------------------------------

def _names(sel):
    return [m.name for m in sel.matrices]


def test_default_selection_is_linear_weights(llama):
    src = open_source(llama[0])
    sel = select_matrices(src, [src])
    assert sel.skipped == [] and len(sel.matrices) == 2 * len(PROJ)
    assert {(m.layer, m.module) for m in sel.matrices} == {(i, p) for i in (0, 1) for p in PROJ}
    q = next(m for m in sel.matrices if m.name == "model.layers.1.self_attn.q_proj.weight")
    assert q == MatrixSpec(q.name, q.name, None, 1, "q_proj", (32, 32))
    assert torch.equal(read_matrix(src, q), llama[1][q.name])

    with_emb = select_matrices(src, [src], embeddings=True)
    extra = [m for m in with_emb.matrices if m not in sel.matrices]
    assert {(m.module, m.layer, m.shape) for m in extra} == {("embed_tokens", None, (64, 32)),
                                                             ("lm_head", None, (64, 32))}


def test_include_exclude(llama):
    src = open_source(llama[0])
    assert {m.module for m in select_matrices(src, [], include=r"\.mlp\.").matrices} == {
        "gate_proj", "up_proj", "down_proj"}
    assert {m.layer for m in select_matrices(src, [], exclude=r"layers\.1\.").matrices} == {0}
    assert _names(select_matrices(src, [], include="embed_tokens")) == ["model.embed_tokens.weight"]
    with _raises(r"tensor model.layers.0.input_layernorm.weight is not a matrix \(shape \(32,\)\)"):
        select_matrices(src, [], include="layers.0.input_layernorm")
    with _raises("invalid include regex"):
        select_matrices(src, [], include="(")
    with _raises("no matrix selected"):
        select_matrices(src, [], include="q_proj", exclude="q_proj")


def test_biases_are_not_matrices(tmp_path):
    model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    model.save_pretrained(tmp_path)
    src = open_source(tmp_path)
    assert len(select_matrices(src, []).matrices) == 2 * len(PROJ)
    with _raises(r"q_proj.bias is not a matrix \(shape \(32,\)\)"):
        select_matrices(src, [], include=r"q_proj\.bias")


def test_missing_and_mismatched_tensors(llama, tmp_path):
    sd = llama[1]
    base = open_source(llama[0])
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    short = {n: t for n, t in sd.items() if n != q} | {k: torch.zeros(8, 32)}
    ck = open_source(_write(tmp_path / "ck", short))
    with _raises(f"checkpoint {ck.label}: tensor {q} is missing"):
        select_matrices(base, [base, ck])
    with _raises(rf"checkpoint {ck.label}: tensor {k} has shape \(8, 32\), base has \(16, 32\)"):
        select_matrices(base, [ck], include="k_proj")
    sel = select_matrices(base, [base, ck], on_mismatch="skip")
    assert [n for n, _ in sel.skipped] == [q, k] and "missing" in sel.skipped[0][1]
    assert len(sel.matrices) == 2 * len(PROJ) - 2 and q not in _names(sel)
    with _raises("every selected matrix was skipped"):
        select_matrices(base, [ck], include=q, on_mismatch="skip")
    with _raises("on_mismatch"):
        select_matrices(base, [ck], on_mismatch="ignore")


def test_nan_is_refused(llama, tmp_path):
    sd = dict(llama[1])
    name = "model.layers.0.mlp.down_proj.weight"
    sd[name] = sd[name].clone()
    sd[name][3, 5] = float("nan")
    src = open_source(_write(tmp_path / "nan", sd))
    sel = select_matrices(src, [])
    spec = next(m for m in sel.matrices if m.name == name)
    with _raises(f"checkpoint {src.label}: tensor {name} has NaN/Inf values"):
        read_matrix(src, spec)
    ok = next(m for m in sel.matrices if m.module == "up_proj")
    assert torch.equal(read_matrix(src, ok), sd[ok.name])


# ---- fused matrices ---------------------------------------------------------------------------------

def test_phi3_split_reproduces_the_model(tmp_path):
    """Oracle: a Llama built from the split q/k/v and gate/up parts computes Phi-3's exact logits,
    so the split rows are the ones Phi-3 itself uses."""
    torch.manual_seed(0)
    cfg = dict(TINY, rms_norm_eps=1e-5, rope_theta=10000.0, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
    phi = Phi3ForCausalLM(Phi3Config(**cfg)).eval()
    phi.save_pretrained(tmp_path / "phi")
    src = open_source(tmp_path / "phi")
    sel = select_matrices(src, [src], embeddings=True)
    fused = "model.layers.0.self_attn.qkv_proj.weight"
    parts = {m.name: m for m in sel.matrices if m.tensor == fused}
    assert {n: (m.module, m.rows, m.shape) for n, m in parts.items()} == {
        fused + "[q]": ("q_proj", slice(0, 32), (32, 32)),
        fused + "[k]": ("k_proj", slice(32, 48), (16, 32)),
        fused + "[v]": ("v_proj", slice(48, 64), (16, 32))}
    assert sorted(m.module for m in sel.matrices if m.layer == 1) == sorted(PROJ)

    llama = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    weights = {}
    for m in sel.matrices:
        target = m.tensor.replace("qkv_proj", m.module).replace("gate_up_proj", m.module)
        weights[target] = read_matrix(src, m)
    weights |= {n: src.read(n) for n in src.names() if "norm" in n}
    assert set(weights) == set(llama.state_dict())
    llama.load_state_dict(weights)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, phi(ids).logits, rtol=1e-5, atol=1e-5)


def test_same_tensors_compares_bytes_band_by_band(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "COMPARE_BYTES", 64)  # bands of a few rows: the difference is in the last one
    w = {"a.weight": torch.randn(24, 16), "b.weight": torch.randn(16, 24).bfloat16()}
    base = open_source(_write(tmp_path / "base", w))
    save_file(w, str(tmp_path / "copy.safetensors"), metadata={"other": "header"})
    copy = open_source(tmp_path / "copy.safetensors")
    names = list(w)
    assert same_tensors(base, base, names) and same_tensors(base, copy, names)
    changed = {**w, "b.weight": w["b.weight"].clone()}
    changed["b.weight"][-1, -1] += 1
    assert not same_tensors(base, open_source(_write(tmp_path / "changed", changed)), names)
    assert same_tensors(base, open_source(_write(tmp_path / "changed2", changed)), ["a.weight"])
    others = ({**w, "b.weight": w["b.weight"].float()}, {**w, "b.weight": w["b.weight"].T}, {"a.weight": w["a.weight"]})
    for i, other in enumerate(others):  # another dtype, another shape, a tensor missing
        assert not same_tensors(base, open_source(_write(tmp_path / f"other{i}", other)), names)


def test_runs_of_one_fused_base_share_it(tmp_path):
    # the split parts' rows (slices) key the runs measured together as well as whole matrices do
    torch.manual_seed(0)
    phi = Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0)).eval()
    phi.save_pretrained(tmp_path / "base")
    for p in phi.parameters():
        p.data += 1e-3 * torch.randn_like(p)
    phi.save_pretrained(tmp_path / "run" / "checkpoint-1")
    a = analyze([Run("sft", tmp_path / "base", [tmp_path / "run"]), Run("rlvr", tmp_path / "base", [tmp_path / "run"])])
    assert a.unique("run") == ["sft", "rlvr"]
    names = {r.matrix for r in a.rows}
    assert "model.layers.0.self_attn.qkv_proj.weight[k]" in names
    for run in ("sft", "rlvr"):
        assert [r.value for r in a.where(run=run, metric="fro_norm")] == [
            r.value for r in a.where(run="sft", metric="fro_norm")]


def test_fused_kept_whole_without_a_layout(tmp_path):
    qkv = {"model.layers.0.self_attn.qkv_proj.weight": torch.randn(64, 32),
           "gpt_neox.layers.0.attention.query_key_value.weight": torch.randn(96, 32)}
    for config in (None, {"hidden_size": 32, "num_attention_heads": 8, "num_key_value_heads": 8}):
        src = open_source(_write(tmp_path / str(config is None), qkv, config))
        sel = select_matrices(src, [src])
        assert {(m.name, m.module, m.rows) for m in sel.matrices} == {
            ("model.layers.0.self_attn.qkv_proj.weight", "qkv_proj", None),
            ("gpt_neox.layers.0.attention.query_key_value.weight", "query_key_value", None)}
