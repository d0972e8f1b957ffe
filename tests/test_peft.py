"""LoRA adapters (peft) in the recorder: D = s B A against the frozen base weight, under the base weight's name.

Planted adapters with known spectra (B = U diag(sigma) / s, A = V^T, so D = U diag(sigma) V^T exactly) come
back as the tracked singular values and subspaces, with peft's scaling (alpha / r; alpha / sqrt(r) under
rsLoRA); TRL's SFTTrainer(peft_config=...) records the trained adapters; DoRA and other adapter types are
refused with one line.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from geometry import analyze
from geometry.capture.callbacks import GeometryCallback
from geometry.capture.recorder import Recorder, RecorderConfig
from geometry.capture.store import read_manifest, read_snapshot, read_tracking
from geometry.errors import GeometryError
from geometry.subspaces import subspace_sim

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

R, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj"]
NAMES = sorted(f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in TARGETS)


def tiny_llama(vocab=96):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def lora(model, **kw):
    return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, **kw))


def orthonormal(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed))).Q


@pytest.mark.parametrize("rslora", [False, True])
def test_planted_adapters_come_back_with_their_spectra(tmp_path, rslora):
    """Step 0: B = 0, the store's base is the frozen base weights under their own names. Step 1: planted
    factors, D = U diag(sigma) V^T; the tracked top-K singular values, ||D||_F and subspaces are the planted
    ones, and the snapshot is W0 + D. Scaling is peft's: the same factors under the other scaling rule give
    a D larger or smaller by sqrt(r)."""
    base = tiny_llama()
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = lora(base, use_rslora=rslora)
    scale = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    run = tmp_path / "run"
    rec = Recorder(model, run, RecorderConfig(snapshot_every=1, lock_k=2, oversample=2, tracking_dtype="float32"))
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5]) * 1e-2
    planted = {}
    with torch.no_grad():
        for i, (name, m) in enumerate((n, m) for n, m in model.get_base_model().named_modules()
                                      if isinstance(m, peft.tuners.lora.LoraLayer)):
            mm, nn_ = m.base_layer.weight.shape
            U, V = orthonormal(mm, R, 2 * i), orthonormal(nn_, R, 2 * i + 1)
            m.lora_B["default"].weight.copy_(U * sigma / scale)  # (m, r)
            m.lora_A["default"].weight.copy_(V.mT)  # (r, n)
            planted[f"{name}.weight"] = (U, V)
    rec.step(1)
    rec.close()

    man = read_manifest(run)
    assert [t.name for t in man.tensors] == NAMES == sorted(planted)
    stored_base, snap, st = read_snapshot(run, None), read_snapshot(run, 1), read_tracking(run, 1)
    for name, (U, V) in planted.items():
        assert torch.equal(stored_base[name], w0[name])  # the frozen base weight, under the base model's name
        d = U * sigma @ V.mT
        assert torch.allclose(snap[name], w0[name] + d, atol=1e-6)
        assert st[name].fro == pytest.approx(float(sigma.norm()), rel=1e-5)
        assert torch.allclose(st[name].s, sigma[:2], rtol=1e-4)
        assert float(subspace_sim(st[name].u, U[:, :2])) > 0.9999
        assert float(subspace_sim(st[name].v, V[:, :2])) > 0.9999


def test_dora_and_other_adapter_types_are_refused_with_one_line(tmp_path):
    cases = {"DoRA adapter": lora(tiny_llama(), use_dora=True),
             "peft adapter type IA3": peft.get_peft_model(tiny_llama(), peft.IA3Config(
                 target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])),
             "peft adapter type LOHA": peft.get_peft_model(tiny_llama(), peft.LoHaConfig(target_modules=TARGETS)),
             "peft adapter type ADALORA": peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(
                 target_modules=TARGETS, total_step=10))}
    for says, model in cases.items():
        with pytest.raises(GeometryError, match=says) as err:
            Recorder(model, tmp_path / says.replace(" ", "-"))
        assert "\n" not in str(err.value)
        assert not (tmp_path / says.replace(" ", "-")).exists() or not any((tmp_path / says.replace(" ", "-"))
                                                                           .iterdir())


def test_gradient_projection_refuses_a_peft_model_in_one_line(tmp_path):
    from transformers import Trainer, TrainingArguments

    from geometry.capture.callbacks import GradientProjectionCallback

    data = Dataset.from_dict({"input_ids": [[1, 5, 6, 7, 2]] * 8, "labels": [[1, 5, 6, 7, 2]] * 8})
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no")
    trainer = Trainer(model=lora(tiny_llama()), args=args, train_dataset=data,
                      callbacks=[GradientProjectionCallback(start_frac=0.5, lock_k=2)])
    with pytest.raises(GeometryError, match="peft \\(LoRA\\) models are not supported") as err:
        trainer.train()
    assert "\n" not in str(err.value)


def test_sft_trainer_with_peft_config_records_the_adapters(tmp_path):
    """TRL SFTTrainer(peft_config=LoraConfig(...)): the trained adapters' D = s B A is what the store holds, at
    every step, and the merged final snapshot equals the frozen base plus it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    specials, chars = ("<pad>", "<bos>", "<eos>", "<unk>"), "0123456789+="
    vocab = {t: i for i, t in enumerate(specials + tuple(chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", model_max_length=64)
    data = Dataset.from_list([{"prompt": f"{i}+{i + 1}=", "completion": str(2 * i + 1)} for i in range(16)])
    base = tiny_llama(vocab=len(vocab))
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    run = tmp_path / "geometry"
    args = SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4,
                     learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                     disable_tqdm=True, seed=0, max_length=32)
    trainer = SFTTrainer(model=base, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS),
                         callbacks=[GeometryCallback(run, RecorderConfig(snapshot_every=2, lock_k=2, oversample=2))])
    trainer.train()
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    man = read_manifest(run)
    assert [t.name for t in man.tensors] == NAMES and man.tracking_steps == [1, 2, 3, 4] and man.steps == [2, 4]
    layers = {f"{n}.weight": m for n, m in model.get_base_model().named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    final, st = read_snapshot(run, 4), read_tracking(run, 4)
    for name in NAMES:
        d = layers[name].get_delta_weight("default").float()  # peft's own s B A
        assert float(d.norm()) > 0
        assert torch.equal(read_snapshot(run, None)[name], w0[name])
        assert torch.allclose(final[name], w0[name] + d, atol=1e-6)
        assert st[name].fro == pytest.approx(float(d.norm()), rel=1e-4)
        assert float(st[name].s[0]) == pytest.approx(float(torch.linalg.matrix_norm(d, 2)), rel=1e-3)
    # the store reads offline as a merged-weight run, rows under the base weights' names
    result = analyze(run / "base", [run])
    rows = {r.matrix: r.value for r in result.where(metric="stable_rank", step=4).rows}
    assert sorted(rows) == NAMES
    for name in NAMES:
        assert rows[name] == pytest.approx(st[name].fro ** 2 / float(st[name].s[0]) ** 2, rel=0.02)
