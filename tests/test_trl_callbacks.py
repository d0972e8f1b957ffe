"""One callback, every trainer: GeometryCallback unchanged under TRL's SFTTrainer, GRPOTrainer and
DistillationTrainer, and GradientProjectionCallback under SFTTrainer (tiny models, a char tokenizer, CPU).

trl 1.16's DistillationTrainer is on-policy only (the student samples every completion: no ``lmbda``
field); ``beta=1.0`` selects the reverse KL of on-policy distillation.
"""

import inspect

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from geometry import analyze
from geometry.capture.callbacks import GeometryCallback, GradientProjectionCallback
from geometry.capture.recorder import RecorderConfig
from geometry.capture.store import read_manifest, read_snapshot, read_tracking
from geometry.capture.trajectory import tracking_table

STEPS = 4
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3
CHARS = "0123456789+="
MATRICES = 2 * 7  # 2 layers x q, k, v, o, gate, up, down


pytestmark = pytest.mark.usefixtures("one_thread")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, a BOS in front, left padding (generation appends on the right)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + tuple(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=64)


def tiny(kind="llama", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    model.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return model.to(dtype)


def common(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "trainer"), max_steps=STEPS, per_device_train_batch_size=4,
                learning_rate=kw.pop("learning_rate", 1e-3), use_cpu=True, report_to="none", save_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0, **kw)


def sums(n=16):
    return [{"prompt": f"{i}+{i + 1}=", "completion": str(2 * i + 1)} for i in range(n)]


def prompts(n=16):
    return Dataset.from_list([{"prompt": r["prompt"]} for r in sums(n)])


def length_reward(completions, **kwargs):
    """A reward that varies between sampled completions, so that GRPO's group advantages are not all zero."""
    return [float(len(c)) for c in completions]


def check_store(run, model):
    """Every step tracked, snapshots at 2 and 4 (the last equals the trained weights), readable offline."""
    man = read_manifest(run)
    assert man.steps == [2, STEPS] and man.tracking_steps == list(range(1, STEPS + 1)) and man.final_step == STEPS
    assert len(man.tensors) == MATRICES
    final, live = read_snapshot(run, STEPS), dict(model.named_parameters())
    assert all(torch.equal(w, live[n].detach()) for n, w in final.items())
    moved = [st.fro for st in read_tracking(run, STEPS).values()]
    assert len(moved) == MATRICES and min(moved) > 0  # every matrix was updated
    table = tracking_table(run)
    assert table.unique("step") == man.tracking_steps
    result = analyze(run / "base", [run])
    assert result.unique("step") == man.steps
    assert len(result.where(metric="stable_rank", step=STEPS).values()) == MATRICES


def test_sft_trainer(tmp_path):
    model, run = tiny("llama"), tmp_path / "geometry"
    cb = GeometryCallback(run, RecorderConfig(snapshot_every=2))
    args = SFTConfig(max_length=32, **common(tmp_path))
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sums()), processing_class=char_tokenizer(),
               callbacks=[cb]).train()
    check_store(run, model)
    assert cb.stats.fallbacks == 0


def test_grpo_trainer(tmp_path):
    model, run = tiny("qwen2"), tmp_path / "geometry"
    cb = GeometryCallback(run, RecorderConfig(snapshot_every=2))
    args = GRPOConfig(num_generations=4, max_completion_length=8, **common(tmp_path))
    GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=prompts(),
                processing_class=char_tokenizer(), callbacks=[cb]).train()
    check_store(run, model)


def test_distillation_trainer_on_policy_reverse_kl(tmp_path):
    fields = inspect.signature(DistillationConfig).parameters
    assert "beta" in fields and "lmbda" not in fields  # on-policy only; beta=1 is the reverse KL
    model, run = tiny("llama"), tmp_path / "geometry"
    cb = GeometryCallback(run, RecorderConfig(snapshot_every=2))
    args = DistillationConfig(beta=1.0, max_completion_length=8, **common(tmp_path))
    DistillationTrainer(model=model, teacher_model=tiny("llama", seed=1), args=args, train_dataset=prompts(),
                        processing_class=char_tokenizer(), callbacks=[cb]).train()
    check_store(run, model)


def test_gradient_projection_under_sft_trainer(tmp_path):
    """SPEC item 9 through a TRL trainer: with plain SGD (no weight decay), after the start step t0 = 1 the
    update D_T - D_1 lies in the top-K right singular subspace of D_1 (float64: rounding only)."""
    k, model, run = 8, tiny("llama", dtype=torch.float64), tmp_path / "geometry"
    proj = GradientProjectionCallback(start_frac=0.25, lock_k=k, side="right")
    rec = GeometryCallback(run, RecorderConfig(snapshot_every=1, track_every=0))
    args = SFTConfig(max_length=32, optim="sgd", weight_decay=0.0, **common(tmp_path, learning_rate=0.1))
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sums()), processing_class=char_tokenizer(),
               callbacks=[proj, rec]).train()
    assert proj.start_step == 1
    w0, w1, wT = read_snapshot(run, None), read_snapshot(run, 1), read_snapshot(run, STEPS)
    for name in w0:
        d1 = (w1[name] - w0[name]).double()
        V = torch.linalg.svd(d1, full_matrices=False).Vh[:k].T  # (n, k)
        later = (wT[name] - w1[name]).double()  # (m, n) D_T - D_t0
        assert later.norm() > 0
        assert (later - later @ V @ V.T).norm() / later.norm() < 1e-9, name
