"""`hexswarm generate` as a user runs it: JSON output, one-line errors, crashed ranks."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from conftest import run_cli
from hexswarm.errors import UserError


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_json_output_has_the_documented_fields(tiny_model):
    p = run_cli("generate", "--model", str(tiny_model), "--prompt", "Hello", "--hetero-config", "1", "2",
                "--pp-partition", "3", "1", "--max-new-tokens", "6", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) >= {"prompt_tokens", "tokens", "text", "finish_reason", "layout", "timings"}
    assert out["layout"] == {"hetero_config": [1, 2], "pp_partition": [3, 1]}
    assert len(out["tokens"]) == 6 and out["finish_reason"] == "length"
    assert out["prompt_tokens"][0] == 1  # BOS from the tokenizer's post-processor


def test_stop_string_ends_generation(tiny_model):
    free = json.loads(run_cli("generate", "--model", str(tiny_model), "--prompt", "Hello", "--max-new-tokens",
                              "12", "--json").stdout)
    stop = free["text"][3:5]
    assert stop.strip(), free["text"]
    p = run_cli("generate", "--model", str(tiny_model), "--prompt", "Hello", "--max-new-tokens", "12",
                "--stop", stop, "--json")
    out = json.loads(p.stdout)
    assert out["finish_reason"] == "stop"
    assert out["text"] == free["text"][: free["text"].find(stop)]
    assert len(out["tokens"]) < 12


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--hetero-config", "1", "1", "--pp-partition", "2", "1"], ["sums to 3", "4 layers"]),
        (["--hetero-config", "1", "1", "--pp-partition", "4"], ["2 stages", "1"]),
        (["--hetero-config", "3"], ["TP degree 3", "attention heads"]),
        (["--top-p", "1.5"], ["--top-p"]),
        (["--temperature", "-0.5"], ["--temperature"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--dtype", "float8"], ["--dtype"]),
        (["--hetero-config", "x"], ["hetero-config"]),
    ],
)
def test_bad_flags_give_one_line_errors(tiny_model, args, needles):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_model), "--prompt", "Hi", *args), *needles)


def _copy(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_missing_checkpoint_file(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path)
    (model / "model.safetensors").unlink()
    assert_one_line_error(run_cli("generate", "--model", str(model), "--prompt", "Hi"), "no model.safetensors")


def test_missing_model_directory(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi"), "does not exist")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_file(tiny_model, tmp_path, damage):
    model = _copy(tiny_model, tmp_path)
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "--model", str(model), "--prompt", "Hi", "--hetero-config", "2"),
                          "model.safetensors")


def test_unknown_architecture(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("generate", "--model", str(model), "--prompt", "Hi"), "GPT2LMHeadModel")


def test_prompt_longer_than_context(tiny_model):
    assert_one_line_error(run_cli("generate", "--model", str(tiny_model), "--prompt", "word " * 800),
                          "context is 512")


def test_crashed_rank_is_named_and_nothing_hangs(tiny_model):
    t0 = time.monotonic()
    p = run_cli("generate", "--model", str(tiny_model), "--prompt", "Hi", "--hetero-config", "1", "2",
                "--pp-partition", "2", "2", env={"HEXSWARM_TEST_CRASH_RANK": "2"}, timeout=90)
    assert_one_line_error(p, "rank 2 (stage 1, TP rank 1)")
    assert time.monotonic() - t0 < 60


def test_plain_output_is_the_text_then_one_summary_line(tiny_model):
    args = ["generate", "--model", str(tiny_model), "--prompt", "Hello", "--hetero-config", "1", "2",
            "--pp-partition", "3", "1", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3"]
    plain, as_json = run_cli(*args), run_cli(*args, "--json")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == json.loads(as_json.stdout)["text"] + "\n"
    lines = [line for line in plain.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, plain.stderr
    assert re.fullmatch(r"\[6 tokens, finish=length, layout TP \[1, 2\] / layers \[3, 1\], "
                        r"prefill \d+\.\d{3}s, decode \d+\.\d{3}s\]", lines[0]), lines[0]


def test_timings_add_up(tiny_model):
    p = run_cli("generate", "--model", str(tiny_model), "--prompt", "Hello", "--hetero-config", "2",
                "--max-new-tokens", "8", "--json")
    t = json.loads(p.stdout)["timings"]
    assert set(t) == {"load_s", "prefill_s", "decode_s", "decode_ms_per_token", "total_s"}
    assert t["load_s"] > 0 and t["prefill_s"] > 0 and t["decode_s"] > 0
    assert abs(t["prefill_s"] + t["decode_s"] - t["total_s"]) <= 2e-4
    assert abs(t["decode_ms_per_token"] - 1000 * t["decode_s"] / 7) <= 0.1


def test_failed_stage_leader_is_named(tiny_model, monkeypatch):
    from hexswarm.runtime.offline import GenerateJob, generate
    from hexswarm.runtime.stage_host import StageHost

    run = StageHost.run

    def failing_last_stage(self, op):
        if self.spec.is_last:
            raise RuntimeError("boom")
        return run(self, op)

    monkeypatch.setattr(StageHost, "run", failing_last_stage)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"^rank 1 \(stage 1, TP rank 0\) failed: RuntimeError: boom"):
        generate(GenerateJob(str(tiny_model), "Hi", [1, 1], [2, 2], max_new_tokens=4))
    assert time.monotonic() - t0 < 30
