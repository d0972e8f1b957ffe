"""Static logit lens (docs/metrics.md, "Static logit lens"): the top singular directions of each final update that
writes to the residual stream, read through the final norm's weight and the unembedding as the tokens they promote
and suppress.

For a matrix W (out x in) writing to the residual stream, D = W_T - W0 = sum_i s_i u_i v_i^T; an input along v_i
adds s_i u_i to the residual stream, which the model reads out as logits E (gamma * u_i) (E: the unembedding,
vocab x hidden; gamma: the final norm's weight). The norm's data-dependent scaling (1 / RMS or 1 / std) is left out:
one positive number per position, it scales every logit alike and orders no token differently. The sign of a
singular pair is arbitrary; each direction is reported with the sign whose largest logit is the largest in
magnitude (the side the direction is most specific about).

Memory: the unembedding is read once per run (as stored), each matrix's update is formed and decomposed alone, and
its top directions kept; they are scored against the unembedding a band of rows at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from geometry.errors import GeometryError, one_line
from geometry.linalg import SVD, exact_svd, gram_svd, randomized_svd, spectrum
from geometry.offline.config import AnalysisConfig
from geometry.offline.matrices import MatrixSpec, read_matrix
from geometry.offline.sources import Checkpoint, TensorSource
from geometry.selection import is_norm, layer_of, module_of

# Modules whose output is added to the residual stream: attention outputs (o_proj; GPT-2 and Qwen-1 c_proj; OPT,
# BART out_proj; InternLM2 wo; OLMo attn_out) and MLP / expert down projections (down_proj; Mixtral w2; OPT, Phi fc2;
# GPT-NeoX, Falcon dense_4h_to_h; OLMo ff_out). "dense" writes it only as an attention output (Phi, GPT-NeoX).
RESIDUAL_WRITERS = frozenset("o_proj down_proj w2 c_proj out_proj wo attn_out fc2 dense_4h_to_h ff_out".split())
ATTENTION_PARENTS = frozenset({"attention", "self_attn", "self_attention", "attn"})
# Models whose Linear layers are transformers' Conv1D, stored (in, out): their residual side is the columns.
CONV1D_MODELS = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
# Models whose RMSNorm multiplies by (1 + weight): the stored weight is gamma - 1.
ONE_PLUS_NORMS = ("gemma", "paligemma", "recurrent_gemma", "vaultgemma", "t5gemma", "qwen3_next", "qwen3_5",
                  "step3p7")
FINAL_NORMS = ("model.norm.weight", "ln_f.weight", "final_layernorm.weight", "final_layer_norm.weight",
               "norm_f.weight", "final_norm.weight", "norm.weight")  # name endings, the most specific first
UNEMBEDDINGS = ("lm_head.weight", "embed_out.weight")
TIED_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                   "tok_embeddings.weight")  # read as the unembedding when no lm_head is stored (tied weights)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
RESOLVED = 1e-6  # directions with s_i <= RESOLVED s_1 are not resolved by the Gram path (docs/metrics.md): not listed
BAND_BYTES = 64 << 20  # float32 bytes of the unembedding's rows scored at a time
CHUNK = 256  # directions scored together: one pass over the unembedding for all of them


class Token(NamedTuple):
    token: str | None  # decoded with the checkpoint's tokenizer; None without one (or past its vocabulary)
    id: int  # row of the unembedding
    logit: float  # E (gamma * u) at that row, float32


class LensDirection(NamedTuple):
    """One singular direction of a final update, read as tokens (a record of lens.json)."""

    run: str
    step: int  # the run's final step
    matrix: str
    layer: int | None
    module: str
    direction: int  # i, from 0: the i-th largest singular value
    singular_value: float  # s_i of D
    update_norm: float  # ||D||_F, which orders matrices in summary.md
    promoted: tuple[Token, ...]  # the largest logits, descending
    suppressed: tuple[Token, ...]  # the most negative logits, most negative first

    def to_json(self) -> dict:
        return {**self._asdict(), "promoted": [list(t) for t in self.promoted],
                "suppressed": [list(t) for t in self.suppressed]}

    @classmethod
    def from_json(cls, d: dict) -> LensDirection:
        tokens = {side: tuple(Token(*t) for t in d[side]) for side in ("promoted", "suppressed")}
        return cls(**{**d, **tokens})


class Readout(NamedTuple):
    """What a run's residual stream is read out through."""

    unembedding: torch.Tensor  # (V, h) as stored
    gamma: torch.Tensor  # (h,) float64: the final norm's scale, ones where none is found
    center: bool  # a LayerNorm: the mean is subtracted before the scale
    names: str  # which tensors, for the notes


def writes_residual(name: str) -> bool:
    """Whether a matrix's output is added to the residual stream, by its module name (``RESIDUAL_WRITERS``)."""
    module = module_of(name)
    parts = name.removesuffix(".weight").split(".")
    return module in RESIDUAL_WRITERS or (module == "dense" and len(parts) > 1 and parts[-2] in ATTENTION_PARENTS)


def _model_type(config: dict | None) -> str:
    cfg = config or {}
    text = cfg.get("text_config")
    return str((text if isinstance(text, dict) else {}).get("model_type") or cfg.get("model_type") or "")


def readout(source: TensorSource) -> Readout:
    """The unembedding (``lm_head``, else the tied input embedding) and the final norm's scale of a model."""
    names = source.names()
    found = [n for ends in (UNEMBEDDINGS, TIED_EMBEDDINGS) for n in names if n.endswith(ends)
             and len(source.shape(n)) == 2]
    if not found:
        raise GeometryError(f"{source.label}: no unembedding (lm_head.weight, or a tied embed_tokens.weight)")
    E = source.read(found[0])  # (V, h)
    h = E.shape[1]
    norms = [n for n in names if is_norm(n) and layer_of(n) is None and tuple(source.shape(n)) == (h,)]
    norm = next((hits[0] for ends in FINAL_NORMS if len(hits := [n for n in norms if n.endswith(ends)]) == 1), None)
    if norm is None:
        return Readout(E, torch.ones(h, dtype=torch.float64), False, f"{found[0]}, no final norm found (gamma = 1)")
    gamma = source.read(norm).double()
    model_type = _model_type(source.config)
    if model_type.startswith(ONE_PLUS_NORMS):
        gamma = 1.0 + gamma
    cfg = source.config or {}
    layer_norm = any(k in cfg for k in ("layer_norm_eps", "layer_norm_epsilon", "layernorm_epsilon"))
    center = norm.removesuffix("weight") + "bias" in source or (layer_norm and "rms_norm_eps" not in cfg)
    return Readout(E, gamma, center, f"{found[0]} through {norm}" + (" (centred)" if center else ""))


def load_tokenizer(*sources: TensorSource):
    """The first tokenizer found beside the sources' weights (transformers, local files only), and where; (None,
    why) when there is none."""
    why = "no tokenizer beside the weights"
    for source in sources:
        where = Path(source.label)
        folders = [where.parent if where.is_file() else where, where / "huggingface"]  # verl keeps it there
        for folder in folders if where.exists() else [source.label]:  # a hub name: its local cache
            if isinstance(folder, Path) and not any((folder / f).is_file() for f in TOKENIZER_FILES):
                continue
            try:
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), str(folder)
            except Exception as e:  # a hub name not cached, a tokenizer transformers cannot read
                why = f"tokenizer at {folder} unreadable ({one_line(e)})"
    return None, why


def top_directions(D: torch.Tensor, k: int, cfg: AnalysisConfig) -> SVD:
    """D's top-k singular triplets, float64, by the analysis's update path (``cfg.update_svd``): Gram eigh
    (checked), seeded randomized SVD checked against the Gram spectrum, or LAPACK's SVD."""
    if cfg.update_svd == "exact":
        return exact_svd(D, k)
    if cfg.update_svd == "randomized":
        return randomized_svd(D, k, oversample=cfg.oversample, n_iter=cfg.n_iter, seed=cfg.seed,
                              check=spectrum(D, small_values=False))
    return gram_svd(D, k, small_values=False)


def extremes(E: torch.Tensor, X: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """The n largest and n smallest entries of each column of E X, and their rows: E (V, h) as stored, read a band
    of rows at a time in float32; X (h, c). Returns (top values, top rows, bottom values, bottom rows), each (c, n),
    top descending, bottom ascending."""
    V, h = E.shape
    n = min(n, V)
    X = X.float()
    band = max(1, BAND_BYTES // (4 * h))
    found: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}  # largest? -> each band's values, rows
    for r0 in range(0, V, band):
        logits = E[r0:r0 + band].to(X.device, torch.float32) @ X  # (b, c)
        for largest, (values, rows) in found.items():
            v, i = logits.topk(min(n, logits.shape[0]), dim=0, largest=largest)  # (b, c)
            values.append(v)
            rows.append(i + r0)
    out = []
    for largest, (values, rows) in found.items():  # the bands' candidates, each row once
        v, at = torch.cat(values).topk(n, dim=0, largest=largest)  # (n, c)
        out += [v.T, torch.cat(rows).gather(0, at).T]
    return tuple(out)


class _Pending(NamedTuple):
    spec: MatrixSpec
    index: int
    s: float
    norm: float
    x: torch.Tensor  # (h,) gamma * u, float64


def lens(label: str, base: TensorSource, final: Checkpoint, matrices: Sequence[MatrixSpec],
         cfg: AnalysisConfig) -> tuple[list[LensDirection], list[str]]:
    """One run's lens at its final checkpoint: every matrix of ``matrices`` that writes to the residual stream,
    its top ``cfg.lens_top`` directions, ``cfg.lens_tokens`` tokens each way. Returns the directions and notes."""
    source = final.source
    chosen = [s for s in matrices if writes_residual(s.name)]
    if not chosen:
        return [], [f"{label}: logit lens: no selected matrix writes to the residual stream (o_proj, down_proj, ...)"]
    out = readout(source if any(n.endswith(UNEMBEDDINGS + TIED_EMBEDDINGS) for n in source.names()) else base)
    tokenizer, where = load_tokenizer(source, base)
    h = out.unembedding.shape[1]
    conv1d = _model_type(base.config).startswith(CONV1D_MODELS)
    device = cfg.torch_device()
    gamma = out.gamma.to(device)
    found: list[LensDirection] = []
    pending: list[_Pending] = []
    skipped, fallbacks = [], 0
    for spec in chosen:
        side = spec.shape[1] if conv1d else spec.shape[0]  # the residual side of D
        if side != h:
            skipped.append(spec.name)
            continue
        D = read_matrix(source, spec).to(device, torch.float64)  # (m, n)
        D -= read_matrix(base, spec).to(device)
        svd = top_directions(D, min(cfg.lens_top, *spec.shape), cfg)
        fallbacks += "->" in svd.method
        vectors = svd.V if conv1d else svd.U  # (h, k)
        norm = float(torch.linalg.vector_norm(D))
        del D
        s = svd.S.cpu()
        for i in range(vectors.shape[1]):
            if not s[0] > 0 or s[i] <= RESOLVED * s[0]:
                break
            u = vectors[:, i] - vectors[:, i].mean() if out.center else vectors[:, i]
            pending.append(_Pending(spec, i, float(s[i]), norm, gamma * u))
        if len(pending) >= CHUNK:
            found += _score(label, final.step, pending, out.unembedding, tokenizer, cfg.lens_tokens)
            pending = []
    found += _score(label, final.step, pending, out.unembedding, tokenizer, cfg.lens_tokens)
    notes = [f"{label}: logit lens of {len(chosen) - len(skipped)} matrices at step {final.step}: {out.names}; "
             + (f"tokens decoded by the tokenizer at {where}" if tokenizer is not None else f"token ids ({where})")]
    if fallbacks:
        notes.append(f"{label}: logit lens: {fallbacks} decompositions fell back to the exact SVD (fast path failed "
                     "its check)")
    if skipped:
        notes.append(f"{label}: logit lens: {len(skipped)} matrices whose output side is not the unembedding's "
                     f"width {h} left out, e.g. {skipped[0]}")
    return found, notes


def _score(label: str, step: int, pending: list[_Pending], E: torch.Tensor, tokenizer, n: int) -> list[LensDirection]:
    """The directions' promoted and suppressed tokens, each signed so that its largest logit is the largest in
    magnitude."""
    if not pending:
        return []
    top_v, top_i, bot_v, bot_i = (t.cpu() for t in extremes(E, torch.stack([p.x for p in pending], dim=1), n))
    out = []
    for j, p in enumerate(pending):
        up = (top_v[j], top_i[j]), (bot_v[j], bot_i[j])
        if top_v[j, 0] < -bot_v[j, 0]:  # -u's largest logit is the larger: report -u
            up = (-bot_v[j], bot_i[j]), (-top_v[j], top_i[j])
        promoted, suppressed = (tuple(Token(_decode(tokenizer, int(i)), int(i), float(v)) for v, i in zip(*side,
                                                                                                            strict=True))
                                for side in up)
        out.append(LensDirection(label, step, p.spec.name, p.spec.layer, p.spec.module, p.index, p.s, p.norm,
                                 promoted, suppressed))
    return out


def _decode(tokenizer, i: int) -> str | None:
    if tokenizer is None or i >= len(tokenizer):
        return None
    return tokenizer.decode([i])


def to_json(directions: Sequence[LensDirection]) -> str:
    """lens.json: a list of one object per direction (``LensDirection``), one a line, tokens as [token, id, logit]."""
    return "[\n" + ",\n".join(json.dumps(d.to_json()) for d in directions) + "\n]\n"


def from_json(text: str) -> list[LensDirection]:
    return [LensDirection.from_json(d) for d in json.loads(text)]


def markdown(directions: Sequence[LensDirection], matrices: int = 3, top: int = 3, tokens: int = 5) -> str:
    """summary.md's lens section ('' without directions): per run, the ``top`` directions of the ``matrices``
    matrices whose update is largest (||D||_F), ``tokens`` tokens each way."""
    from geometry.offline.markdown import fmt, table  # here: the lens's readers need no markdown

    if not directions:
        return ""
    parts = ["## Static logit lens", "",
             f"Per run at its final step, the top {top} singular directions u_i of the update of the {matrices} "
             "matrices writing to the residual stream whose update is largest (||D||_F), read through the final "
             "norm's weight and the unembedding (docs/metrics.md): the tokens each promotes (largest logits) and "
             f"suppresses (most negative), {tokens} each. Every direction: lens.json.", ""]
    for run in dict.fromkeys(d.run for d in directions):
        mine = [d for d in directions if d.run == run]
        norms = {d.matrix: d.update_norm for d in mine}
        largest = sorted(norms, key=lambda m: -norms[m])[:matrices]
        rows = [[d.matrix, d.direction, fmt(d.singular_value), _tokens(d.promoted[:tokens]),
                 _tokens(d.suppressed[:tokens])]
                for m in largest for d in mine if d.matrix == m and d.direction < top]
        parts += [f"### {run} (step {mine[0].step})", "",
                  table(["matrix", "i", "s_i", "promoted", "suppressed"], rows), ""]
    return "\n".join(parts)


def _tokens(tokens: Sequence[Token]) -> str:
    """Tokens quoted (whitespace and control characters visible), ids as #id where none is decoded."""
    return " ".join(repr(t.token).replace("`", "\\`") if t.token is not None else f"#{t.id}" for t in tokens)
