"""Random-weight Llama checkpoints in HF format, for tests, the demo and benchmarks.

Weights are scaled so every layer changes the residual stream and the logits
are well spread: greedy decoding then depends on attention and the KV cache,
and float rounding cannot flip near-tied tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# A small corpus for the tokenizer's merges: any text still encodes, byte by byte.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "hexswarm serves language models over a swarm of peers.",
    "Once upon a time there was a tiny model that answered every prompt.",
    "Pipeline stages pass activations; tensor parallel ranks share the work.",
    "Hello, world! How are you today? I am fine, thank you.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \"",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2


@dataclass
class TinySpec:
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 384
    head_dim: int | None = None
    rope_theta: float = 10000.0
    llama3_rope: bool = False
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_positions: int = 512
    seed: int = 0
    shards: int = 1
    bin_format: bool = False


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return tok


def hf_config(spec: TinySpec, vocab: int) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.attention_bias,
        "mlp_bias": spec.mlp_bias,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }
    if spec.head_dim:
        cfg["head_dim"] = spec.head_dim
    if spec.llama3_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    return cfg


def random_weights(spec: TinySpec, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    hd = spec.head_dim or spec.hidden // spec.heads
    H, F = spec.hidden, spec.intermediate

    def lin(out_f, in_f, gain=1.0):
        return torch.randn(out_f, in_f, generator=g) * (gain / math.sqrt(in_f))

    def vec(n, center=0.0, scale=0.1):
        return center + scale * torch.randn(n, generator=g)

    # A tied head reads logits off the embedding: keep it small beside the layers'
    # outputs, or the residual stream predicts its own input token forever.
    embed_scale = 0.3 if spec.tie_embeddings else 1.0
    w = {"model.embed_tokens.weight": embed_scale * torch.randn(vocab, H, generator=g)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(H, 1.0)
        w[p + "post_attention_layernorm.weight"] = vec(H, 1.0)
        w[p + "self_attn.q_proj.weight"] = lin(spec.heads * hd, H, 2.0)
        w[p + "self_attn.k_proj.weight"] = lin(spec.kv_heads * hd, H, 2.0)
        w[p + "self_attn.v_proj.weight"] = lin(spec.kv_heads * hd, H)
        w[p + "self_attn.o_proj.weight"] = lin(H, spec.heads * hd)
        w[p + "mlp.gate_proj.weight"] = lin(F, H)
        w[p + "mlp.up_proj.weight"] = lin(F, H)
        w[p + "mlp.down_proj.weight"] = lin(H, F)
        if spec.attention_bias:
            for name, n in (("q", spec.heads * hd), ("k", spec.kv_heads * hd), ("v", spec.kv_heads * hd), ("o", H)):
                w[p + f"self_attn.{name}_proj.bias"] = vec(n)
        if spec.mlp_bias:
            w[p + "mlp.gate_proj.bias"] = vec(F)
            w[p + "mlp.up_proj.bias"] = vec(F)
            w[p + "mlp.down_proj.bias"] = vec(H)
    w["model.norm.weight"] = vec(H, 1.0)
    if not spec.tie_embeddings:
        w["lm_head.weight"] = lin(vocab, H, 4.0)
    return {k: v.contiguous() for k, v in w.items()}


def _write_weights(out: Path, weights: dict[str, torch.Tensor], shards: int, bin_format: bool) -> None:
    from safetensors.torch import save_file

    names = list(weights)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    if bin_format:
        for i, group in enumerate(groups):
            fname = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({n: weights[n] for n in group}, out / fname)
        return
    if shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def write_tokenizer(out: Path, vocab: int) -> int:
    """tokenizer.json and tokenizer_config.json of the tiny byte-level BPE (<s> = 1, </s> = 2); its vocab size.
    Also gives a random checkpoint of another shape a tokenizer (ids past its vocab decode to nothing)."""
    tok = build_tokenizer(vocab)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=1,
        )
    )
    return tok.get_vocab_size()


def make_tiny_llama(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a complete random-weight HF Llama checkpoint (config, weights, tokenizer)."""
    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out, spec.vocab)
    (out / "config.json").write_text(json.dumps(hf_config(spec, vocab), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    (out / "hexswarm_tiny.json").write_text(json.dumps(asdict(spec), indent=1))
    _write_weights(out, random_weights(spec, vocab), spec.shards, spec.bin_format)
    return out
