"""A character-level tokenizer for the arithmetic task, as a ``transformers`` fast tokenizer.

One token per character keeps the vocabulary tiny (17 ids), so the embedding and lm_head are
negligible next to the transformer blocks whose geometry the demo studies. Wrapping it as a
``PreTrainedTokenizerFast`` lets the TRL trainers use it unchanged; it has no chat template
because the trainers are fed plain-text prompts.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3; pad first so zero-initialised buffers read as padding
CHARS = "0123456789+-="  # everything the task writes

# Not set on the tokenizer (the trainers get plain-text prompts). Trainers that accept only
# conversational data (trl.experimental.iw_opd) can use it: it renders messages exactly as the
# plain-text path tokenises them, "<bos>" + prompt [+ answer + "<eos>"].
PASSTHROUGH_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The char tokenizer: ``"12+3="`` -> ``<bos> 1 2 + 3 =``; decoding concatenates characters.

    A BOS is prepended by the post-processor (``add_special_tokens=True``, the default), so the
    trainers' own tokenisation of a prompt matches the pretraining sequences exactly. EOS is not
    appended: a prompt must end open so the model writes the answer next.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    # BPE with no merges is exactly a character model; WordLevel would need a per-char pre-tokenizer.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIALS))
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.decoder = decoders.Fuse()  # join characters without the default space separator
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation (ours and TRL's) appends to the right end of the prompt
        model_max_length=64,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained`` from a local directory (never the hub)."""
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
