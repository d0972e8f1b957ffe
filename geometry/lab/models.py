"""The demo's two Llama models, built from configs (no hub): a small student and a larger teacher.

Llama is the architecture most post-training papers use, and its separate q/k/v/o and
gate/up/down projections are exactly the matrices SPEC.md measures, with no fused qkv to split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from geometry.errors import GeometryError
from geometry.lab.tokenizer import build_tokenizer


@dataclass
class ModelConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 32  # longest sequence is BOS + "9999+9999=19998" + EOS = 17 tokens; room for 6 digits

    def __post_init__(self):
        if min(self.hidden, self.layers, self.heads, self.intermediate, self.max_positions) < 1:
            raise GeometryError(f"model sizes must be positive, got {self}")
        if self.hidden % self.heads:
            raise GeometryError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")


# Student: hidden 128 gives 128x128 attention and 128x384 MLP matrices, enough rank (128) for
# k = rank // 8 = 16 principal directions, and ~0.8M parameters trains at tens of steps a second on
# two cores, so a whole GRPO run fits in minutes.
STUDENT = ModelConfig(hidden=128, layers=4, heads=4, intermediate=384)
# Teacher: 1.5x wider (~1.9M parameters, 7.6 MB in float32), so it can be near-perfect where the
# student is not, while pretraining and scoring the student's samples stay cheap on two cores.
TEACHER = ModelConfig(hidden=192, layers=4, heads=6, intermediate=576)
KINDS = {"student": STUDENT, "teacher": TEACHER}


def build_model(cfg: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised float32 Llama sized by ``cfg``, with the char tokenizer's special ids."""
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),  # 17: 4 specials + 13 characters
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,  # plain multi-head attention: q/k/v all square
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,  # lm_head is its own matrix, analysed (or not) apart from the embedding
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=8,  # an answer is at most 5 digits + EOS on 4-digit operands
    )
    return model


def load_model(path: str | Path) -> LlamaForCausalLM:
    """Load a model saved by ``pretrain`` (HF layout, float32) from a local directory, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise GeometryError(f"{path}: no config.json here; run `geometry lab pretrain` to create the models")
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return model.eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
