"""Smoke tests of the toy GRPO reproduction and the loss benchmark (tiny settings, in-process)."""

import json
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def _load(rel, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_grpo_runs_and_writes_outputs(tmp_path):
    toy = _load("examples/grpo_lopti_toy.py", "grpo_lopti_toy")
    out = tmp_path / "toy"
    summary = toy.main(
        ["--seeds", "1", "--steps", "2", "--sft-steps", "3", "--test-size", "20", "--eval-every", "1",
         "--prompts-per-step", "2", "--group-size", "4", "--out", str(out)]
    )
    data = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in data["rows"]} == {"grpo", "grpo+ar", "grpo+lopti", "grpo+both"}
    steps = {r["variant"]: r["optimizer_steps"] for r in data["rows"]}
    assert steps["grpo+lopti"] == 2 * steps["grpo"] and steps["grpo+both"] == 2 * steps["grpo+ar"]
    assert (out / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len(summary["curves"]["grpo"][0]["test_pass"]) == 3


def test_toy_single_variant_fast(tmp_path):
    toy = _load("examples/grpo_lopti_toy.py", "grpo_lopti_toy1")
    summary = toy.main(
        ["--seeds", "1", "--steps", "1", "--sft-steps", "2", "--test-size", "10", "--eval-every", "1",
         "--prompts-per-step", "2", "--group-size", "4", "--variants", "grpo+both", "--out", str(tmp_path)]
    )
    assert summary["curves"]["grpo+both"][0]["optimizer_steps"] == 4  # 2 mini-batches x 2 Lopti stages


def test_toy_task_reward_is_verifiable():
    toy = _load("examples/grpo_lopti_toy.py", "grpo_lopti_toy2")
    assert [toy.VOCAB[i] for i in toy.encode_prompt(7, 35)] == ["<bos>", "0", "7", "+", "3", "5", "="]
    assert "".join(toy.VOCAB[i] for i in toy.answer_tokens(99, 99)) == "198"


def test_benchmark_quick_runs(tmp_path):
    bench = _load("benchmarks/rl_loss_bench.py", "rl_loss_bench")
    res = bench.main(["--quick", "--reps", "2", "--reps-update", "1", "--json", str(tmp_path / "b.json")])
    assert res["ar_extra_full_vocab_allocations"] == 0
    assert res["allocations"]["base"]["full_vocab_allocations"] == 1  # only the gradient
    assert res["allocations"]["naive_log_softmax"]["full_vocab_allocations"] > 1
    assert res["lopti_update"]["ratio"] > 1.0
