"""The models users train now, counted: `ModelShape` and the named presets.

A GPT (Narayanan et al. 2021) is the default shape; the keywords make it a Llama
(grouped-query attention, SwiGLU, untied embeddings, no dropout, no learned positions)
or a mixture of experts (DeepSeek-V3, Mixtral). Letters: h hidden, a heads, d head
size, g KV heads (GQA; Ainslie et al. 2023), f FFN width, V vocabulary, s sequence,
E experts, k top-k.

Per layer, per token, forward (multiply-adds count 2):
    attention projections   2 (h·a·d + 2·h·g·d + a·d·h)           [a d = h for MHA: 8h²]
    MLP                     2·h·f·(3 if SwiGLU else 2)              [f = 4h: 16h²]
    MoE MLP                 2·h·E (router) + (k + shared)·MLP(f_e)
    attention core          4·s·a·d  (QKᵀ and softmax·V, the full s×s square as Narayanan counts)
    output head             2·h·V, once per token
Training FLOPs are 3x forward (backward = 2x). With these, a GPT-shaped ModelShape
reproduces Narayanan's 72Bslh²(1 + s/(6h) + V/(12lh)) exactly (tests).

Activation bytes one layer keeps for backward, generalizing Korthikanti et al. 2022
(Sec. 4.1) term by term, in units of s·b bytes (2-byte values, 1-byte dropout masks):
    kept whole under TP:  two norm inputs 4h, QKV input 2h, MLP input 2h, two dropout masks 2h
    split by t:           Q 2ad, K and V 4gd, attention output 2ad, MLP 2f·(2 if SwiGLU else 1) + 2f
    scores (split by t):  5as (softmax output, its dropout mask and output); 0 with flash attention
For a GPT (ad = h, g = a, f = 4h) that is Korthikanti's sbh(10 + 24/t + 5as/(ht)).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .formulas import _check_recompute
from .hardware import lookup

__all__ = ["ModelShape", "MODELS", "get_model", "ARCH_FIELDS"]


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    global_batch: int
    source: str = ""
    kv_heads: int | None = None  # None: a (multi-head attention)
    ffn_hidden: int | None = None  # None: 4h
    gated_mlp: bool = False  # SwiGLU: three matrices (Shazeer 2020)
    tied_embeddings: bool = True  # the head reuses the word embedding (GPT) or has its own (Llama)
    position_embeddings: bool = True  # learned s×h positions (GPT); False for RoPE
    dropout: bool = True  # Korthikanti's 1-byte masks; modern runs use none
    head_dim: int | None = None  # None: h/a. MLA (DeepSeek) uses (d_qk + d_v)/2 = 160
    attention_params: int | None = None  # override the projections' weights per layer (MLA)
    experts: int = 0  # routed experts per MoE layer (0: dense)
    top_k: int = 1
    shared_experts: int = 0
    expert_ffn_hidden: int | None = None
    first_dense_layers: int = 0  # DeepSeek-V3 keeps its first 3 layers dense

    # ---- sizes
    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.heads) * self.d

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_dense_layers if self.experts else 0

    def mlp_params(self, f: int) -> int:
        return self.hidden * f * (3 if self.gated_mlp else 2)

    def attn_params(self) -> int:
        h = self.hidden
        return self.attention_params or h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h

    def small_params(self, f: int) -> int:
        """Biases and norms: GPT's 13h per layer (Narayanan 2021); RMSNorm weights only otherwise."""
        h = self.hidden
        if not self.dropout:  # Llama-style: two RMSNorm weights, no biases
            return 2 * h
        return (self.q_dim + 2 * self.kv_dim) + h + f * (2 if self.gated_mlp else 1) + h + 4 * h

    def layer_params(self, moe: bool, active: bool = False) -> float:
        """Weights of one layer (`active`: those one token uses)."""
        if not moe:
            return self.attn_params() + self.mlp_params(self.ffn) + self.small_params(self.ffn)
        fe = self.expert_ffn_hidden or self.ffn
        n = (self.top_k if active else self.experts) + self.shared_experts
        return (
            self.attn_params() + self.hidden * self.experts + n * self.mlp_params(fe) + self.small_params(fe)
        )

    def layer_kinds(self) -> list[bool]:
        """True for each MoE layer, in chain order."""
        return [bool(self.experts) and i >= self.first_dense_layers for i in range(self.layers)]

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden + (self.seq * self.hidden if self.position_embeddings else 0)

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def _per_kind(self, fn) -> float:
        """Sum of fn(moe) over the layers: dense ones, then MoE ones."""
        n_moe = self.moe_layers
        return (self.layers - n_moe) * fn(False) + (n_moe * fn(True) if n_moe else 0.0)

    @property
    def params(self) -> float:
        return self._per_kind(self.layer_params) + self.embedding_params + self.head_params

    @property
    def active_params(self) -> float:
        return self._per_kind(lambda k: self.layer_params(k, True)) + self.embedding_params + self.head_params

    # ---- FLOPs per token, forward
    def layer_matmul_flops(self, moe: bool) -> float:
        if not moe:
            return 2.0 * (self.attn_params() + self.mlp_params(self.ffn))
        fe = self.expert_ffn_hidden or self.ffn
        return 2.0 * (
            self.attn_params()
            + self.hidden * self.experts
            + (self.top_k + self.shared_experts) * self.mlp_params(fe)
        )

    def attention_core_flops(self, seq: int | None = None) -> float:
        return 4.0 * (seq or self.seq) * self.q_dim

    @property
    def head_flops(self) -> float:
        return 2.0 * self.hidden * self.vocab

    def model_flops(self, batch: int, causal: bool = False) -> float:
        """FLOPs one step must do (no recompute): 3 x forward (MFU's numerator; PaLM App. B).
        Attention counts the full s×s square (Narayanan 2021); `causal=True` counts the half a
        causal mask keeps, as some reports do."""
        core = self.attention_core_flops() / (2 if causal else 1)
        per_token = self._per_kind(self.layer_matmul_flops) + self.layers * core
        return 3.0 * batch * self.seq * (per_token + self.head_flops)

    # ---- activation bytes
    def activation_units(self, moe: bool, flash: bool) -> tuple[float, float, float]:
        """(kept whole, split by t, scores) per layer in units of s·b bytes (module docstring)."""
        h, g = self.hidden, 2 if self.gated_mlp else 1
        whole = 4 * h + 2 * h + 2 * h + (2 * h if self.dropout else 0)
        attn = 2 * self.q_dim + 4 * self.kv_dim + 2 * self.q_dim
        if moe:
            fe = self.expert_ffn_hidden or self.ffn
            n = self.top_k + self.shared_experts
            mlp = n * (2 * h + 2 * fe * g + 2 * fe)  # each routed copy keeps its input and hidden
        else:
            mlp = 2 * self.ffn * g + 2 * self.ffn
        scores = 0.0 if flash else (5 if self.dropout else 2) * self.heads * self.seq
        return whole, attn + mlp, scores

    def layer_activation_bytes(
        self,
        seq: int,
        micro_batch: int,
        moe: bool,
        tp: int = 1,
        sequence_parallel: bool = False,
        recompute=None,
        flash: bool = True,
        cp: int = 1,
    ) -> float:
        """Bytes one layer keeps on one of t × c GPUs (c context-parallel ranks hold s/c tokens each,
        whose scores still span all s keys)."""
        _check_recompute(recompute)
        s, b = seq / cp, micro_batch
        if recompute == "full":
            return 2 * s * b * self.hidden / (tp if sequence_parallel else 1)
        whole, split, scores = self.activation_units(moe, flash or recompute == "selective")
        whole = whole / tp if sequence_parallel else whole
        return s * b * (whole + split / tp + scores / tp)

    def arch_kwargs(self) -> dict:
        """The keywords `estimate` takes for this architecture."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in ARCH_FIELDS}


ARCH_FIELDS = (
    "kv_heads",
    "ffn_hidden",
    "gated_mlp",
    "tied_embeddings",
    "position_embeddings",
    "dropout",
    "head_dim",
    "attention_params",
    "experts",
    "top_k",
    "shared_experts",
    "expert_ffn_hidden",
    "first_dense_layers",
)

_LLAMA = dict(gated_mlp=True, tied_embeddings=False, position_embeddings=False, dropout=False)

# GPT-shaped models use Narayanan's 12lh² count; the named presets carry their published shapes.
MODELS = {
    "1.7b": ModelShape(24, 2304, 24, 51200, 2048, 512, "Narayanan 2021 Table 1"),
    "7.5b": ModelShape(36, 4096, 32, 51200, 2048, 512, "Narayanan 2021 Table 1"),
    "7b": ModelShape(
        32,
        4096,
        32,
        32000,
        4096,
        1024,
        "Llama 2 7B shape (Touvron 2023), 4M-token batch",
        ffn_hidden=11008,
        **_LLAMA,
    ),
    "13b": ModelShape(
        40,
        5120,
        40,
        32000,
        4096,
        1024,
        "Llama 2 13B shape (Touvron 2023), 4M-token batch",
        ffn_hidden=13824,
        **_LLAMA,
    ),
    "39b": ModelShape(48, 8192, 64, 51200, 2048, 1536, "Narayanan 2021 Table 1"),
    "70b": ModelShape(
        80,
        8192,
        64,
        32000,
        4096,
        1024,
        "Llama 2 70B (Touvron 2023): GQA 8, f 28672, 4M-token batch",
        kv_heads=8,
        ffn_hidden=28672,
        **_LLAMA,
    ),
    "175b": ModelShape(96, 12288, 96, 51200, 2048, 1536, "GPT-3 175B (Brown 2020), 3.2M-token batch"),
    "530b": ModelShape(105, 20480, 128, 51200, 2048, 2520, "Narayanan 2021 Table 1 / MT-NLG"),
    "1t": ModelShape(128, 25600, 160, 51200, 2048, 3072, "Narayanan 2021 Table 1"),
    "gpt3-175b": ModelShape(
        96,
        12288,
        96,
        51200,
        2048,
        1536,
        "Brown et al. 2020, Table 2.1: 96 layers, d 12288, 96 heads, 2048 context, 3.2M-token "
        "batch; vocabulary 50,257 padded to 51,200 (Megatron)",
    ),
    "llama3-8b": ModelShape(
        32,
        4096,
        32,
        128256,
        8192,
        512,
        "Llama 3 8B (Dubey et al. 2024, Table 3): GQA 8, f 14336, V 128256; 4M-token batch",
        kv_heads=8,
        ffn_hidden=14336,
        **_LLAMA,
    ),
    "llama3-70b": ModelShape(
        80,
        8192,
        64,
        128256,
        8192,
        1024,
        "Llama 3 70B (Dubey et al. 2024, Table 3): GQA 8, f 28672, V 128256; 8M-token batch",
        kv_heads=8,
        ffn_hidden=28672,
        **_LLAMA,
    ),
    "llama3-405b": ModelShape(
        126,
        16384,
        128,
        128256,
        8192,
        2048,
        "Llama 3 405B (Dubey et al. 2024, Tables 3-4): GQA 8, f 53248, V 128256, 16M-token batch",
        kv_heads=8,
        ffn_hidden=53248,
        **_LLAMA,
    ),
    "mixtral-8x7b": ModelShape(
        32,
        4096,
        32,
        32000,
        4096,
        1024,
        "Mixtral 8x7B (Jiang et al. 2024): 8 experts, top-2, f 14336, GQA 8; batch assumed (4M tokens)",
        kv_heads=8,
        ffn_hidden=14336,
        experts=8,
        top_k=2,
        expert_ffn_hidden=14336,
        **_LLAMA,
    ),
    "deepseek-v3": ModelShape(
        61,
        7168,
        128,
        129280,
        4096,
        15360,
        "DeepSeek-V3 report (2024), Sec. 4.2: 61 layers, h 7168, 128 heads (MLA: d_qk 192, "
        "d_v 128), 1 shared + 256 routed experts of f 2048, top-8, first 3 layers dense "
        "(f 18432), V 129280, batch 15360 x 4096",
        ffn_hidden=18432,
        head_dim=160,
        attention_params=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168,
        experts=256,
        top_k=8,
        shared_experts=1,
        expert_ffn_hidden=2048,
        first_dense_layers=3,
        **_LLAMA,
    ),
}
MODELS["405b"] = replace(MODELS["llama3-405b"], source="alias of llama3-405b")


def get_model(model) -> ModelShape:
    return lookup(
        MODELS,
        model,
        ModelShape,
        "model",
        "pass a ModelShape(layers, hidden, heads, vocab, seq, global_batch, ...)",
    )
