"""The engine against transformers' LlamaForCausalLM on the same checkpoint, for every layout."""

from __future__ import annotations

import pytest
import torch

from hexswarm.runtime.offline import GenerateJob, generate

PROMPT = "Once upon a time, the quick brown fox"
NEW_TOKENS = 16

# (hetero_config, pp_partition) for 4-layer models; uneven partitions included
LAYOUTS_4 = [
    ([], []),
    ([1], [4]),
    ([2], [4]),
    ([1, 1], [2, 2]),
    ([2, 1], [3, 1]),
    ([1, 2], [1, 3]),
    ([1, 2, 1], [1, 2, 1]),
]


def hf_reference(model_dir, prompt_ids):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist(), logits


@pytest.fixture(scope="module")
def references(tiny_models):
    refs = {}
    for name, path in tiny_models.items():
        # tokenization is ours on both sides: feed transformers the same ids
        first = generate(GenerateJob(model_dir=str(path), prompt=PROMPT, max_new_tokens=1))
        refs[name] = (first["prompt_tokens"], *hf_reference(path, first["prompt_tokens"]))
    return refs


def _check(tiny_models, references, name, hc, pp):
    prompt_ids, ref_tokens, ref_logits = references[name]
    out = generate(GenerateJob(model_dir=str(tiny_models[name]), prompt=PROMPT, hetero_config=hc,
                               pp_partition=pp, max_new_tokens=NEW_TOKENS, return_logits=True))
    assert out["prompt_tokens"] == prompt_ids
    assert out["tokens"] == ref_tokens, f"layout {hc}/{pp} diverges from transformers"
    rel = (out["logits"] - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 1e-4, f"layout {hc}/{pp}: logits differ by {rel:.2e} relative"
    expected_reason = "eos" if ref_tokens[-1] == 2 and len(ref_tokens) <= NEW_TOKENS else "length"
    assert out["finish_reason"] == expected_reason


@pytest.mark.parametrize("hc,pp", LAYOUTS_4, ids=lambda v: "-".join(map(str, v)) or "single")
def test_gqa_model_every_layout(tiny_models, references, hc, pp):
    _check(tiny_models, references, "gqa", hc, pp)


@pytest.mark.parametrize("hc,pp", [([], []), ([2], [4]), ([1, 2, 1], [1, 2, 1]), ([2, 1], [1, 3])],
                         ids=lambda v: "-".join(map(str, v)) or "single")
def test_llama3_rope_tied_single_kv_head(tiny_models, references, hc, pp):
    _check(tiny_models, references, "llama3", hc, pp)


@pytest.mark.parametrize("hc,pp", [([], []), ([2, 1], [2, 1]), ([1, 2], [1, 2])],
                         ids=lambda v: "-".join(map(str, v)) or "single")
def test_biases_and_bin_checkpoint(tiny_models, references, hc, pp):
    _check(tiny_models, references, "bias_bin", hc, pp)


def test_reference_is_not_trivial(references):
    """Guard: the reference must be a varied sequence, or equality would prove little."""
    for name, (_, tokens, logits) in references.items():
        assert len(set(tokens)) >= 4, f"{name}: reference output too repetitive: {tokens}"
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) > 1e-3, f"{name}: near-tied logits make the test meaningless"
