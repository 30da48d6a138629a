"""Smoke tests of the toy GRPO reproduction and the loss benchmark (tiny settings, in-process)."""

import json
from pathlib import Path

import pytest


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
    hard = toy.Task(digits=3, extra_vocab=64)  # the harder variant: longer answers, larger vocabulary
    assert len(hard.vocab) == 13 + 64 and (hard.prompt_len, hard.resp_len) == (9, 4)
    assert "".join(hard.vocab[i] for i in hard.answer_tokens(999, 999)) == "1998"
    pairs = hard.shuffled_pairs(limit=500)
    assert len(set(pairs)) == 500 and all(0 <= a < 1000 and 0 <= b < 1000 for a, b in pairs)
    assert toy.Task().shuffled_pairs()[:5] == toy.DEFAULT_TASK.shuffled_pairs()[:5] and len(toy.Task().shuffled_pairs()) == 10_000


def test_benchmark_quick_runs(tmp_path):
    bench = _load("benchmarks/rl_loss_bench.py", "rl_loss_bench")
    res = bench.main(["--quick", "--reps", "2", "--reps-update", "1", "--json", str(tmp_path / "b.json")])
    assert res["ar_extra_full_vocab_allocations"] == 0
    assert res["allocations"]["base"]["full_vocab_allocations"] == 1  # only the gradient
    assert res["allocations"]["naive_log_softmax"]["full_vocab_allocations"] > 1
    assert res["lopti_update"]["ratio"] > 1.0


# ------------------------------------------------------------------------------------------ NeMo-RL v0.7


def _fill(tp, want=None):
    """A value of type ``tp`` with every REQUIRED field filled, plus the fields present in ``want`` (the
    matching part of our overrides YAML): a minimal config shaped by NeMo-RL v0.7's own schema
    (TypedDicts and pydantic models), generated at test time."""
    import types
    import typing

    import typing_extensions

    want = want if isinstance(want, dict) else {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        structured = [a for a in rest if typing_extensions.is_typeddict(a) or hasattr(a, "model_fields")]
        if structured and want:
            return _fill(structured[0], want)
        return None if len(rest) < len(args) else _fill(rest[0], want)
    if origin is typing.Literal:
        return args[0]
    if origin in (typing_extensions.NotRequired, typing_extensions.Required, typing.Annotated):
        return _fill(args[0], want)
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        return []
    if origin is dict or tp in (dict, typing.Any) or origin is typing.Mapping:
        return {}
    if isinstance(tp, type) and hasattr(tp, "model_fields"):  # pydantic model
        return {n: _fill(f.annotation, want.get(n)) for n, f in tp.model_fields.items() if f.is_required() or n in want}
    if typing_extensions.is_typeddict(tp):
        hints = typing.get_type_hints(tp)
        return {k: _fill(hints[k], want.get(k)) for k in hints if k in tp.__required_keys__ or k in want}
    return {bool: False, int: 1, float: 1.0, str: "x"}.get(tp, None)


@pytest.mark.slow  # importing v0.7's grpo module and its third-party stack takes ~25 s on 2 cores
def test_nemo_rl_v07_grpo_entry_point_builds_up_to_ray(tmp_path):
    """examples/rl/nemo_rl_grpo_lopti.py on the REAL NeMo-RL v0.7.0 source (tests/rl/nemo_rl_upstream.py):
    NeMo-RL's config loading, overrides and ``MasterConfig`` validation, then ``main`` runs until
    ``init_ray`` (the first step that needs the GPU cluster); our loss and policy wrapper are built from the
    validated ``MasterConfig``.  The base config is generated from v0.7's own schema (NeMo-RL's
    examples/configs are not in the upstream snapshot)."""
    import pytest
    import torch
    import yaml

    from nemo_rl_upstream import use

    with use("v0.7.0") as nrl:
        grpo = nrl.module("nemo_rl.algorithms.grpo")
        ours = yaml.safe_load((ROOT / "examples" / "rl" / "grpo_lopti_nemo_rl.yaml").read_text())
        base = _fill(grpo.MasterConfig, ours)
        base["logger"]["log_dir"] = str(tmp_path / "logs")
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
        ex = _load("examples/rl/nemo_rl_grpo_lopti.py", "nemo_rl_grpo_lopti")
        argv = ["--base-config", str(tmp_path / "base.yaml"), "loss_fn.lopti_eta=0.4", "grpo.max_num_steps=7"]

        args, overrides = ex.parse_args(argv)
        assert args.config == ex.DEFAULT_CONFIG and overrides == argv[2:]
        master = ex.load_master_config(args, overrides)
        assert isinstance(master, grpo.MasterConfig) and master.grpo["max_num_steps"] == 7
        assert master.loss_fn.ratio_clip_max == 0.24 and master.loss_fn.model_extra["lopti_eta"] == 0.4

        class Policy:  # stand-in for NeMo-RL's Ray-backed Policy, which needs GPUs
            def train(self, data, loss_fn, **kw):
                return {"loss": torch.zeros(1), "all_mb_metrics": {}}

        loss_fn, policy = ex.lopti_loss_and_policy(master, Policy())
        assert type(loss_fn.loss) is nrl.loss_module.ClippedPGLossFn
        assert (loss_fn.advantage_reweight_alpha, loss_fn.lopti_eta, policy.eta) == (0.3, 0.4, 0.4)
        assert ex.select_trainer(master) is grpo.grpo_train
        master.data_plane = {"enabled": True}
        with pytest.raises(ValueError, match="data_plane"):
            ex.lopti_loss_and_policy(master, Policy())

        class NeedsGPUs(Exception):
            pass

        def init_ray(*a, **k):
            raise NeedsGPUs

        nrl.module("nemo_rl.distributed.virtual_cluster").init_ray = init_ray
        with pytest.raises(NeedsGPUs):
            ex.main(argv)
