"""A zoo of tiny random-weight Hugging Face causal LMs, for testing the attention finder.

Every entry builds an fp32 model in eval mode from a fixed seed, with the common shape:
hidden 128, 4 attention heads, 2 KV heads where the architecture allows (1 for the MQA
cases, 4 where the family is MHA only), head_dim 32, 2 layers, vocab 256, intermediate 256,
max positions 128. ``initializer_range`` is raised to 0.1 (HF default 0.02) so attention is
far from uniform: a wrong RoPE position or a wrong cache slot changes the logits visibly.

    from tests.zoo import ZOO, build
    model = build("llama")               # or ZOO["llama"]()
    ZOO["llama"].kv_heads                # expected facts, for tests

``ZOO`` holds the entries that export with ``palu_fx.export.export_decoder`` and match
eager logits. ``BROKEN`` holds families we tried that do not export (or do not match), with
the reason; tests mark them xfail (non-strict) so a transformers upgrade that fixes them shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

HIDDEN = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
LAYERS = 2
VOCAB = 256
INTERMEDIATE = 256
MAX_POS = 128
INIT_RANGE = 0.1

# Shared by every llama-like config (unknown keys are harmless: HF configs keep them).
_COMMON = dict(
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    num_hidden_layers=LAYERS,
    vocab_size=VOCAB,
    intermediate_size=INTERMEDIATE,
    max_position_embeddings=MAX_POS,
    initializer_range=INIT_RANGE,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@dataclass(frozen=True)
class ZooEntry:
    """One architecture: how to build it and what the attention finder should see.

    Facts (per layer unless noted):
      has_rope: any layer applies rotary embeddings to K.
      kv_heads / num_heads / head_dim: K/V cache is [B, kv_heads, S, head_dim].
      rotary_dim: how many of head_dim's channels are rotated (None: no RoPE).
      rope_interleaved: rotation pairs (2i, 2i+1) (GPT-J style) instead of (i, i+D/2).
      fused_qkv: one projection produces Q, K and V (sliced/split/chunked afterwards).
      qkv_bias: the K/V projection has a bias.
      k_norm: a norm on K between the projection and the cache write ("head": per head over
        head_dim, before RoPE; "proj": over the whole K projection, before the head view;
        "head_post_rope": per head, AFTER RoPE).
      nope_layers: layers that skip RoPE.
      sliding_layers: layers with a sliding-window mask (window = sliding_window).
      scale: the attention scale if it is not head_dim**-0.5.
      cache_heads: heads in the static cache buffer if not kv_heads (K/V expanded before the write).
      attn_impl: attention implementation the entry is built with (passed explicitly: defaults differ
        between transformers 5.17 and 5.24, e.g. 5.17 runs Gemma2 through SDPA and silently drops the
        softcap, and picks eager for GPT-J/CodeGen). ``entry(attn_implementation="eager")`` overrides.
      min_transformers: oldest transformers version on which the entry exports (tests xfail below it).
    """

    name: str
    model_type: str
    config: dict[str, Any]
    has_rope: bool = True
    kv_heads: int = KV_HEADS
    num_heads: int = HEADS
    head_dim: int = HEAD_DIM
    num_layers: int = LAYERS
    rotary_dim: int | None = HEAD_DIM
    rope_interleaved: bool = False
    fused_qkv: bool = False
    qkv_bias: bool = False
    k_norm: str | None = None
    nope_layers: tuple[int, ...] = ()
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int | None = None
    scale: float | None = None
    cache_heads: int | None = None
    attn_impl: str = "sdpa"
    min_transformers: str | None = None
    seed: int = 0
    notes: str = ""

    def __call__(self, attn_implementation: str | None = None) -> torch.nn.Module:
        return _build(self, attn_implementation or self.attn_impl)

    def available(self) -> bool:
        """The installed transformers knows this model type."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return self.model_type in CONFIG_MAPPING

    def supported_here(self) -> bool:
        """Available and the installed transformers is new enough for it to export."""
        if not self.available():
            return False
        if self.min_transformers is None:
            return True
        import transformers
        from packaging.version import Version

        return Version(transformers.__version__) >= Version(self.min_transformers)

    def cache_shape(self, batch_size: int = 1, max_cache_len: int = 64) -> tuple[int, int, int, int]:
        """Shape of each layer's key/value cache buffer in the exported program."""
        return (batch_size, self.cache_heads or self.kv_heads, max_cache_len, self.head_dim)


def _build(entry: ZooEntry, attn_implementation: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(entry.model_type, **entry.config)
    torch.manual_seed(entry.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.float().eval()


def _llama_like(**over: Any) -> dict[str, Any]:
    d = dict(_COMMON)
    d.update(over)
    return d


def _mha_like(**over: Any) -> dict[str, Any]:
    d = _llama_like(**over)
    d.pop("num_key_value_heads")
    return d


def _falcon(**over: Any) -> dict[str, Any]:
    d = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS, vocab_size=VOCAB,
             max_position_embeddings=MAX_POS, parallel_attn=True, bias=False, alibi=False,
             initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    d.update(over)
    return d


def _entries() -> list[ZooEntry]:
    E = ZooEntry
    return [
        E("llama", "llama", _llama_like(head_dim=HEAD_DIM)),
        E("llama_mqa", "llama", _llama_like(head_dim=HEAD_DIM, num_key_value_heads=1), kv_heads=1,
          notes="MQA: 1 KV head"),
        E("mistral", "mistral", _llama_like(head_dim=HEAD_DIM, sliding_window=4),
          sliding_layers=(0, 1), sliding_window=4, notes="sliding window on every layer"),
        E("qwen2", "qwen2", _llama_like(), qkv_bias=True),
        E("qwen3", "qwen3", _llama_like(head_dim=HEAD_DIM), k_norm="head"),
        E("gemma", "gemma", _llama_like(head_dim=HEAD_DIM)),
        E("gemma2", "gemma2", _llama_like(head_dim=HEAD_DIM, sliding_window=4, attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0, query_pre_attn_scalar=HEAD_DIM,
                                          layer_types=["sliding_attention", "full_attention"]),
          sliding_layers=(0,), sliding_window=4, attn_impl="eager",
          notes="refuses SDPA (_supports_sdpa=False): eager with tanh softcap"),
        E("gemma3", "gemma3_text", _llama_like(head_dim=HEAD_DIM, sliding_window=4, query_pre_attn_scalar=HEAD_DIM,
                                               layer_types=["sliding_attention", "full_attention"]),
          k_norm="head", sliding_layers=(0,), sliding_window=4,
          notes="q/k RMSNorm per head; local RoPE table (theta 1e4) on sliding layers, global (1e6) on full"),
        E("phi3", "phi3", _llama_like(), fused_qkv=True, notes="qkv_proj sliced by rows"),
        E("gpt_neox", "gpt_neox", _mha_like(), kv_heads=HEADS, rotary_dim=8,
          fused_qkv=True, qkv_bias=True, notes="query_key_value viewed per head then chunk(3); rotary_pct 0.25"),
        E("gpt2", "gpt2", dict(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_inner=INTERMEDIATE, vocab_size=VOCAB,
                               n_positions=MAX_POS, initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2),
          has_rope=False, rotary_dim=None, kv_heads=HEADS, fused_qkv=True, qkv_bias=True,
          notes="Conv1D (addmm, weight [in, out]) then split"),
        E("gptj", "gptj", dict(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_inner=INTERMEDIATE, vocab_size=VOCAB,
                               n_positions=MAX_POS, rotary_dim=16, initializer_range=INIT_RANGE,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
          kv_heads=HEADS, rotary_dim=16, rope_interleaved=True, attn_impl="eager",
          notes="eager (transformers 5.17 has no SDPA for GPT-J); "
                "interleaved partial RoPE (rotary_dim 16) applied in [B,S,H,D] layout before the transpose; "
                "sin/cos gathered from a precomputed embed_positions table buffer (no inv_freq)"),
        E("phi", "phi", _llama_like(), rotary_dim=16, qkv_bias=True, notes="partial_rotary_factor 0.5"),
        E("stablelm", "stablelm", _llama_like(use_qkv_bias=True, qk_layernorm=True), rotary_dim=8,
          qkv_bias=True, k_norm="head",
          notes="partial_rotary_factor 0.25; per-head LayerNorm modules on q and k"),
        E("starcoder2", "starcoder2", _llama_like(sliding_window=None), qkv_bias=True),
        E("olmo", "olmo", _llama_like()),
        E("olmo2", "olmo2", _llama_like(), k_norm="proj",
          notes="q_norm/k_norm RMSNorm over the whole projection (before the head view)"),
        E("cohere", "cohere", _llama_like(use_qk_norm=True, logit_scale=1.0), rope_interleaved=True,
          k_norm="head", notes="interleaved RoPE (repeat_interleave of freqs before cos/sin); per-head LayerNorm "
                               "q/k spelled as mean/sub/pow/rsqrt"),
        E("granite", "granite", _llama_like(attention_multiplier=0.05, embedding_multiplier=2.0,
                                            residual_multiplier=0.5, logits_scaling=2.0),
          scale=0.05, notes="attention scale = attention_multiplier"),
        E("gpt_bigcode", "gpt_bigcode", dict(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_inner=INTERMEDIATE,
                                             vocab_size=VOCAB, n_positions=MAX_POS, multi_query=True,
                                             initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2),
          has_rope=False, rotary_dim=None, kv_heads=1, fused_qkv=True, qkv_bias=True,
          notes="MQA, no RoPE: c_attn linear then split [H*D, D, D]"),
        E("mixtral", "mixtral", _llama_like(head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=None)),
        E("qwen2_moe", "qwen2_moe", _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                                shared_expert_intermediate_size=128),
          qkv_bias=True),
        E("smollm3", "smollm3", _llama_like(no_rope_layers=[1, 0]), nope_layers=(1,),
          notes="layer 1 skips RoPE (NoPE)"),
        E("glm", "glm", _llama_like(head_dim=HEAD_DIM), rotary_dim=16, rope_interleaved=True, qkv_bias=True,
          notes="partial (0.5) interleaved RoPE"),
        E("glm4", "glm4", _llama_like(head_dim=HEAD_DIM), rotary_dim=16, rope_interleaved=True, qkv_bias=True,
          notes="partial (0.5) interleaved RoPE; extra post-attn/post-mlp norms"),
        E("helium", "helium", _llama_like(head_dim=HEAD_DIM), rope_interleaved=True,
          notes="interleaved RoPE: cos/sin sliced to D/2 then repeat_interleave(2)"),
        E("persimmon", "persimmon", _mha_like(qk_layernorm=True), kv_heads=HEADS,
          rotary_dim=16, fused_qkv=True, qkv_bias=True, k_norm="head",
          notes="fused qkv viewed [.., H, 3*D]; per-head LayerNorm; partial_rotary_factor 0.5"),
        E("codegen", "codegen", dict(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_inner=INTERMEDIATE,
                                     vocab_size=VOCAB, n_positions=MAX_POS, n_ctx=MAX_POS, rotary_dim=16,
                                     initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2,
                                     tie_word_embeddings=False),
          kv_heads=HEADS, rotary_dim=16, rope_interleaved=True, fused_qkv=True, attn_impl="eager",
          notes="eager (transformers 5.17 has no SDPA for CodeGen); qkv_proj viewed as mp_num=4 shards of "
                "[q|v|k] then split (order q, V, K!); interleaved partial RoPE from an embed_positions table"),
        E("exaone4", "exaone4", _llama_like(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
          k_norm="head", sliding_layers=(0,), sliding_window=4, nope_layers=(1,),
          notes="q/k norm; full-attention layers skip RoPE when sliding layers exist"),
        E("internlm3", "internlm3", _llama_like(head_dim=HEAD_DIM)),
        E("olmo3", "olmo3", _llama_like(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
          k_norm="proj", sliding_layers=(0,), sliding_window=4),
        E("seed_oss", "seed_oss", _llama_like(head_dim=HEAD_DIM), qkv_bias=True),
        E("ernie4_5", "ernie4_5", _llama_like(head_dim=HEAD_DIM), rope_interleaved=True),
        E("apertus", "apertus", _llama_like(head_dim=HEAD_DIM), k_norm="head"),
        E("arcee", "arcee", _llama_like(head_dim=HEAD_DIM)),
        E("falcon", "falcon", _falcon(new_decoder_architecture=True, num_kv_heads=KV_HEADS), fused_qkv=True,
          cache_heads=HEADS,
          notes="new decoder arch: fused qkv grouped per KV head; K/V broadcast to all heads BEFORE the cache "
                "write (cache holds 4 heads)"),
        E("falcon_mha", "falcon", _falcon(multi_query=False, new_decoder_architecture=False, bias=True),
          kv_heads=HEADS, fused_qkv=True, qkv_bias=True, notes="classic fused qkv, MHA"),
        E("bloom", "bloom", dict(hidden_size=HIDDEN, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB,
                                 initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                 tie_word_embeddings=False),
          has_rope=False, rotary_dim=None, kv_heads=HEADS, fused_qkv=True, qkv_bias=True, attn_impl="eager",
          min_transformers="5.24",
          notes="ALiBi, eager baddbmm attention; fused qkv viewed [.., H, 3, D]. transformers 5.17: export fails "
                "(data-dependent guard 64 - u0 > 0)"),
        E("gpt_neo", "gpt_neo", dict(hidden_size=HIDDEN, num_heads=HEADS, num_layers=LAYERS,
                                     attention_types=[[["global"], LAYERS]], intermediate_size=INTERMEDIATE,
                                     vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=INIT_RANGE,
                                     bos_token_id=1, eos_token_id=2),
          has_rope=False, rotary_dim=None, kv_heads=HEADS, attn_impl="eager", scale=1.0,
          notes="global layers only (local layers are BROKEN); eager, no score scaling"),
        E("gpt_oss", "gpt_oss", _llama_like(head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
          qkv_bias=True, sliding_layers=(0,), sliding_window=4, attn_impl="eager",
          notes="attention sinks (per-head logit concatenated to the scores, max-subtracted softmax, last column "
                "dropped); YaRN RoPE: cos/sin scaled by attention_factor, rotation via chunk(2)"),
        E("nemotron", "nemotron", _llama_like(head_dim=HEAD_DIM), rotary_dim=16,
          notes="partial_rotary_factor 0.5; LayerNorm1P"),
        E("cohere2", "cohere2", _llama_like(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
          rope_interleaved=True, sliding_layers=(0,), sliding_window=4, nope_layers=(1,),
          notes="RoPE (interleaved) only on sliding layers; full-attention layers are NoPE"),
        E("ministral", "ministral", _llama_like(head_dim=HEAD_DIM, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"]),
          sliding_layers=(0,), sliding_window=4),
        E("hunyuan_v1_dense", "hunyuan_v1_dense", _llama_like(head_dim=HEAD_DIM), k_norm="head_post_rope",
          notes="q/k RMSNorm AFTER RoPE"),
        E("qwen3_moe", "qwen3_moe", _llama_like(head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=64), k_norm="head"),
        E("olmoe", "olmoe", _llama_like(num_experts=4, num_experts_per_tok=2)),
        E("diffllama", "diffllama", _llama_like(head_dim=HEAD_DIM),
          notes="differential attention: two SDPA calls share K; V chunked in head halves then repeat; "
                "outputs combined with lambda and an rms_norm BEFORE o_proj"),
        E("vaultgemma", "vaultgemma", _llama_like(head_dim=HEAD_DIM, sliding_window=4, query_pre_attn_scalar=HEAD_DIM,
                                                  layer_types=["sliding_attention", "full_attention"]),
          sliding_layers=(0,), sliding_window=4, attn_impl="eager"),
        E("jetmoe", "jetmoe", _llama_like(kv_channels=HEAD_DIM, num_experts_per_tok=2, num_local_experts=4),
          fused_qkv=True,
          notes="mixture of attention heads: q and o projections are routed experts (data-dependent splits); "
                "K/V from one fused kv_proj chunked in halves; GQA by repeat (tile: q head h uses kv head h % Hkv)"),
        E("llama4", "llama4_text", _llama_like(head_dim=HEAD_DIM, intermediate_size_mlp=INTERMEDIATE,
                                               num_local_experts=2, no_rope_layers=[1, 0], attention_chunk_size=4),
          rope_interleaved=True, k_norm="head_post_rope", nope_layers=(1,),
          notes="complex RoPE (view_as_complex * polar freqs); weightless L2 q/k norm after RoPE on RoPE layers; "
                "NoPE layer scales q by a position-dependent temperature; chunked attention mask (4)"),
    ]


# Families tried that do not export (or export but run wrong) with transformers' static-cache
# wrapper on torch 2.13 / transformers 5.24.
def _broken() -> list[tuple[ZooEntry, str]]:
    E = ZooEntry
    return [
        (E("falcon_mqa", "falcon", _falcon(multi_query=True, new_decoder_architecture=False), kv_heads=1,
           fused_qkv=True),
         "StaticCache is sized from num_key_value_heads (4 here: the old multi_query flag is not reflected), the "
         "model writes 1 KV head: index_copy_ slice-shape error at trace time"),
        (E("opt", "opt", dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                              ffn_dim=INTERMEDIATE, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
                              word_embed_proj_dim=HIDDEN, init_std=INIT_RANGE, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0),
           has_rope=False, rotary_dim=None, kv_heads=HEADS, qkv_bias=True),
         "positions come from a data-dependent length (unbacked symbol u); `q_length > 1` in sdpa_attention_forward "
         "guards on it: the dynamic export succeeds but bakes a runtime assert S >= 2, so decode (S=1) fails; "
         "a static S=1 export fails with a data-dependent guard"),
        (E("gpt_neo_local", "gpt_neo", dict(hidden_size=HIDDEN, num_heads=HEADS, num_layers=LAYERS,
                                            attention_types=[[["global", "local"], 1]], window_size=4,
                                            intermediate_size=INTERMEDIATE, vocab_size=VOCAB,
                                            max_position_embeddings=MAX_POS, initializer_range=INIT_RANGE,
                                            bos_token_id=1, eos_token_id=2),
           has_rope=False, rotary_dim=None, kv_heads=HEADS, attn_impl="eager", scale=1.0),
         "exports but logits are wrong (rel err ~0.3): the local-attention bias is sliced as "
         "bias[key_len - q_len : key_len] with key_len = static cache length, not the current position"),
        (E("mpt", "mpt", dict(d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=2, max_seq_len=MAX_POS,
                              vocab_size=VOCAB, initializer_range=INIT_RANGE),
           has_rope=False, rotary_dim=None, kv_heads=HEADS, fused_qkv=True, attn_impl="eager"),
         "ALiBi bias sized from a data-dependent length: PendingUnbackedSymbolNotFound"),
        (E("deepseek_v3", "deepseek_v3", _llama_like(kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
                                                     qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4,
                                                     num_experts_per_tok=2, first_k_dense_replace=2,
                                                     moe_intermediate_size=64, n_group=1, topk_group=1)),
         "MLA: StaticCache allocates [B, kv_heads, L, head_dim] from the config but the model writes keys of "
         "qk_nope+qk_rope dims: index_copy_ slice-shape error"),
        (E("minicpm3", "minicpm3", _llama_like(kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
                                               qk_nope_head_dim=32, v_head_dim=32)),
         "MLA (as deepseek_v3): static cache shape does not match the written keys"),
        (E("xglm", "xglm", dict(d_model=HIDDEN, attention_heads=HEADS, num_layers=LAYERS, ffn_dim=INTERMEDIATE,
                                vocab_size=VOCAB, max_position_embeddings=MAX_POS, init_std=INIT_RANGE,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
           has_rope=False, rotary_dim=None, kv_heads=HEADS),
         "sinusoidal positions sliced by a data-dependent length: PendingUnbackedSymbolNotFound"),
        (E("biogpt", "biogpt", _llama_like(), has_rope=False, rotary_dim=None, kv_heads=HEADS),
         "learned positions from a data-dependent length: could not guard on 64 - u0 > 0"),
    ]


ZOO: dict[str, ZooEntry] = {e.name: e for e in _entries()}

# The architectures every pass must handle (PALU_ZOO=core runs only these in tests/test_zoo.py).
CORE: tuple[str, ...] = ("llama", "llama_mqa", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
                         "gpt_neox", "gpt2", "gptj", "phi", "falcon", "gpt_bigcode")
BROKEN: dict[str, tuple[ZooEntry, str]] = {e.name: (e, why) for e, why in _broken()}


def build(name: str) -> torch.nn.Module:
    """Build the zoo model ``name`` (fp32, eval, seeded)."""
    if name in ZOO:
        return ZOO[name]()
    if name in BROKEN:
        return BROKEN[name][0]()
    raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")


def names() -> list[str]:
    return list(ZOO)
