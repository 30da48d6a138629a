"""NeMo-RL adapter tests.

NeMo-RL cannot be installed here (its PyPI name is a placeholder and it needs Ray + CUDA), so the
reference is an independent re-derivation of NeMo-RL's ``ClippedPGLossFn`` (v0.5
``nemo_rl/algorithms/loss_functions.py``; v0.6 ``nemo_rl/algorithms/loss/``), written here with
explicit Python loops over tokens:

    all per-token fields are shifted: x[:, 1:]; mask = token_mask * sample_mask[:, None]
    curr = log_softmax(logits[:, :-1])[input_ids[:, 1:]]          (v0.5; v0.6 passes curr directly)
    r = exp(curr - prev);  rc = clamp(r, 1 - ratio_clip_min, 1 + ratio_clip_max)
    pg = max(-A r, -A rc);  if ratio_clip_c and A < 0: pg = min(pg, -c A)
    if use_importance_sampling_correction: pg *= exp(prev - gen)
    kl = beta * w * (exp(ref - curr) - (ref - curr) - 1),  w = exp(curr - gen) if on-policy approx else 1
    token level:    loss = sum((pg + kl) * mask) / (global_valid_toks + 1e-8)
    sequence level: loss = sum_i sample_mask_i * [sum_t (pg + kl) token_mask / (sum_t token_mask + 1e-8)]
                           / (global_valid_seqs + 1e-8)
    (pg and kl reduced separately and added, which is the same sum.)

The policy-wrapper tests use a fake policy object that records its calls, a stand-in for NeMo-RL's
``Policy`` (which needs Ray workers), and a real tiny torch model whose ``train`` runs real
optimizer steps through the same loss protocol.
"""

import copy
import math

import pytest
import torch

from megatron_pma.rl.core import lopti_masks, reweight_advantages
from megatron_pma.rl.nemo_rl import STAGE_MASK_KEY, LoptiClippedPGLossFn, LoptiPolicy, LossType

V = 11


def _cfg(**kw):
    cfg = dict(
        ratio_clip_min=0.2,
        ratio_clip_max=0.28,
        ratio_clip_c=None,
        reference_policy_kl_penalty=0.0,
        reference_policy_kl_type="k3",
        kl_input_clamp_value=None,
        kl_output_clamp_value=None,
        token_level_loss=True,
        use_on_policy_kl_approximation=False,
        use_importance_sampling_correction=False,
        truncated_importance_sampling_ratio=None,
    )
    cfg.update(kw)
    return cfg


def _data(b=4, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, V, generator=g, dtype=torch.float64) * 2
    input_ids = torch.randint(0, V, (b, s), generator=g)
    lp_true = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    def shifted(x):  # per-token fields are aligned with input_ids; position 0 is unused
        return torch.cat([torch.zeros(b, 1, dtype=x.dtype), x], 1)

    prev = shifted(lp_true + 0.3 * torch.randn(b, s - 1, generator=g, dtype=torch.float64))
    gen = prev + 0.05 * torch.randn(b, s, generator=g, dtype=torch.float64)
    ref = prev + 0.2 * torch.randn(b, s, generator=g, dtype=torch.float64)
    token_mask = torch.zeros(b, s, dtype=torch.float64)
    token_mask[:, 2:] = 1
    token_mask[1, 5:] = 0
    sample_mask = torch.ones(b, dtype=torch.float64)
    sample_mask[2] = 0
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, s).clone()
    data = dict(
        input_ids=input_ids,
        advantages=adv,
        prev_logprobs=prev,
        generation_logprobs=gen,
        reference_policy_logprobs=ref,
        token_mask=token_mask,
        sample_mask=sample_mask,
    )
    return logits, data


def _reference_nemo_rl(logits, d, cfg, gvs, gvt):
    """Independent loop re-derivation of NeMo-RL's clipped PG loss (see module docstring)."""
    b, s = d["input_ids"].shape
    lsm = torch.log_softmax(logits.double(), -1)
    eps = 1e-8
    pg_sum = kl_sum = 0.0
    seq_pg = seq_kl = 0.0
    for i in range(b):
        ptok = ktok = 0.0
        ntok = 0.0
        for t in range(1, s):
            tm = float(d["token_mask"][i, t])
            ntok += tm
            m = tm * float(d["sample_mask"][i])
            curr = float(lsm[i, t - 1, d["input_ids"][i, t]])
            prev = float(d["prev_logprobs"][i, t])
            gen = float(d["generation_logprobs"][i, t])
            a = float(d["advantages"][i, t])
            r = math.exp(curr - prev)
            rc = min(max(r, 1 - cfg["ratio_clip_min"]), 1 + cfg["ratio_clip_max"])
            pg = max(-a * r, -a * rc)
            if cfg["ratio_clip_c"] is not None and a < 0:
                pg = min(pg, -cfg["ratio_clip_c"] * a)
            if cfg["use_importance_sampling_correction"]:
                pg *= math.exp(prev - gen)
            kl = 0.0
            if cfg["reference_policy_kl_penalty"]:
                ref = float(d["reference_policy_logprobs"][i, t])
                w = math.exp(curr - gen) if cfg["use_on_policy_kl_approximation"] else 1.0
                kl = w * cfg["reference_policy_kl_penalty"] * (math.exp(ref - curr) - (ref - curr) - 1)
            pg_sum += pg * m
            kl_sum += kl * m
            ptok += pg * tm
            ktok += kl * tm
        sm = float(d["sample_mask"][i])
        seq_pg += sm * ptok / (ntok + eps)
        seq_kl += sm * ktok / (ntok + eps)
    if cfg["token_level_loss"]:
        return pg_sum / (gvt + eps) + kl_sum / (gvt + eps)
    return seq_pg / (gvs + eps) + seq_kl / (gvs + eps)


CONFIGS = [
    {},
    {"token_level_loss": False},
    {"ratio_clip_c": 3.0},
    {"reference_policy_kl_penalty": 0.05},
    {"reference_policy_kl_penalty": 0.05, "use_on_policy_kl_approximation": True, "token_level_loss": False},
    {"use_importance_sampling_correction": True, "ratio_clip_c": 2.0},
]


@pytest.mark.parametrize("over", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_matches_nemo_rl_clipped_pg_when_ar_and_lopti_off(over):
    cfg = _cfg(**over)
    logits, data = _data()
    # global normalisers larger than this micro-batch's own counts, as with several micro-batches
    gvt = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]).sum() + 9
    gvs = data["sample_mask"].sum() + 2
    fn = LoptiClippedPGLossFn({**cfg, "advantage_reweight_alpha": 0.0, "lopti_eta": None})
    expect = _reference_nemo_rl(logits, data, cfg, float(gvs), float(gvt))

    loss_v05, metrics = fn(logits, data, gvs, gvt)  # v0.5 positional, logits
    assert loss_v05.item() == pytest.approx(expect, rel=1e-6, abs=1e-9)
    assert metrics["loss"] == pytest.approx(expect, rel=1e-6, abs=1e-9)

    curr = torch.log_softmax(logits[:, :-1], -1).gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
    loss_v06, _ = fn(data=data, global_valid_seqs=gvs, global_valid_toks=gvt, next_token_logprobs=curr)
    assert loss_v06.item() == pytest.approx(expect, rel=1e-9, abs=1e-12)
    assert fn(curr, data, gvs, gvt)[0].item() == pytest.approx(expect, rel=1e-9, abs=1e-12)  # v0.6 positional
    assert fn.loss_type == (LossType.TOKEN_LEVEL if cfg["token_level_loss"] else LossType.SEQUENCE_LEVEL)


def test_gradient_flows_to_logits_and_matches_autograd_reference():
    cfg = _cfg(reference_policy_kl_penalty=0.01)
    logits, data = _data(seed=3)
    logits.requires_grad_(True)
    gvt = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]).sum()
    fn = LoptiClippedPGLossFn(cfg)
    loss, _ = fn(logits, data, torch.tensor(3.0), gvt)
    (g,) = torch.autograd.grad(loss, logits)
    # the same loss through log_softmax + gather
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
    loss2, _ = fn(data=data, global_valid_seqs=torch.tensor(3.0), global_valid_toks=gvt, next_token_logprobs=lp)
    (g2,) = torch.autograd.grad(loss2, logits)
    torch.testing.assert_close(g, g2)
    assert g[:, -1].abs().sum() == 0  # last position predicts nothing


def test_ar_equals_reweighted_advantages():
    logits, data = _data(seed=5)
    gvt, gvs = torch.tensor(17.0), torch.tensor(3.0)
    ar = LoptiClippedPGLossFn(_cfg(advantage_reweight_alpha=0.3))(logits, data, gvs, gvt)[0]
    d2 = dict(data, advantages=reweight_advantages(data["advantages"], data["prev_logprobs"], 0.3))
    manual = LoptiClippedPGLossFn(_cfg())(logits, d2, gvs, gvt)[0]
    plain = LoptiClippedPGLossFn(_cfg())(logits, data, gvs, gvt)[0]
    torch.testing.assert_close(ar, manual)
    assert not torch.allclose(ar, plain)


@pytest.mark.parametrize("token_level", [True, False])
def test_stage_mask_splits_loss_without_changing_normaliser(token_level):
    logits, data = _data(seed=7)
    fn = LoptiClippedPGLossFn(_cfg(reference_policy_kl_penalty=0.02, token_level_loss=token_level, advantage_reweight_alpha=0.2))
    gvt, gvs = torch.tensor(20.0), torch.tensor(3.0)
    full = fn(logits, data, gvs, gvt)[0]
    mask = data["token_mask"] * data["sample_mask"][:, None]
    low, high = lopti_masks(data["prev_logprobs"], mask, 0.5)
    parts = [fn(logits, dict(data, **{STAGE_MASK_KEY: m.double()}), gvs, gvt)[0] for m in (low, high)]
    torch.testing.assert_close(parts[0] + parts[1], full)


def test_config_validation():
    with pytest.raises(ValueError):
        LoptiClippedPGLossFn(_cfg(ratio_clip_c=1.0))
    assert LoptiClippedPGLossFn(_cfg(ratio_clip_c=-1)).ratio_clip_c is None
    with pytest.raises(ValueError):
        LoptiClippedPGLossFn(_cfg(advantage_reweight_alpha=1.5))
    with pytest.raises(ValueError):
        LoptiClippedPGLossFn(_cfg(lopti_eta=0.0))
    with pytest.raises(NotImplementedError):
        LoptiClippedPGLossFn(_cfg(sequence_level_importance_ratios=True))


# ------------------------------------------------------------------------------------------ policy


class RecordingPolicy:
    """Stand-in for NeMo-RL's ``Policy`` (NeMo-RL cannot be installed here): records every
    ``train`` call and returns a NeMo-RL-shaped result."""

    def __init__(self):
        self.calls = []
        self.some_attribute = "forwarded"

    def train(self, data, loss_fn, eval_mode=False, gbs=None, mbs=None):
        self.calls.append(dict(data=data, loss_fn=loss_fn, eval_mode=eval_mode, gbs=gbs, mbs=mbs))
        n = len(self.calls)
        return {"loss": torch.tensor([float(n)]), "grad_norm": torch.tensor(0.1 * n), "all_mb_metrics": {"loss": [n]}}


def test_lopti_policy_runs_two_stages_with_fixed_groups():
    _, data = _data(seed=11)
    frozen = {k: v.clone() for k, v in data.items()}
    mask = data["token_mask"] * data["sample_mask"][:, None]
    eta = data["prev_logprobs"].exp()[mask.bool()].median().item()  # both groups populated
    inner = RecordingPolicy()
    pol = LoptiPolicy(inner, eta=eta)
    loss_fn = LoptiClippedPGLossFn(_cfg())
    out = pol.train(data, loss_fn, gbs=8, mbs=2)

    assert len(inner.calls) == 2
    low, high = lopti_masks(data["prev_logprobs"], mask, eta)
    assert low.any() and high.any()
    for call, expect in zip(inner.calls, (low, high)):
        d = call["data"]
        assert call["loss_fn"] is loss_fn and call["gbs"] == 8 and call["mbs"] == 2
        assert torch.equal(d[STAGE_MASK_KEY].bool(), expect)
        assert d["token_mask"] is data["token_mask"]  # untouched, same tensor
        assert d["prev_logprobs"] is data["prev_logprobs"]  # not recomputed
    # caller's data not modified
    assert STAGE_MASK_KEY not in data
    for k, v in frozen.items():
        assert torch.equal(data[k], v)
    assert out["loss"].item() == 3.0 and out["all_mb_metrics"]["loss"] == [1, 2]
    assert set(out["lopti_stages"]) == {"low", "high"}
    assert pol.some_attribute == "forwarded"

    inner2 = RecordingPolicy()
    LoptiPolicy(inner2, eta=eta, low_first=False).train(data, loss_fn)
    assert torch.equal(inner2.calls[0]["data"][STAGE_MASK_KEY].bool(), high)

    inner3 = RecordingPolicy()
    LoptiPolicy(inner3, eta=None).train(data, loss_fn)
    assert len(inner3.calls) == 1 and inner3.calls[0]["data"] is data


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=V, dim=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.mix(torch.cumsum(h, 1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]))
        return self.out(h)


class TinyTorchPolicy:
    """A real torch policy with NeMo-RL's ``train(data, loss_fn, eval_mode, gbs, mbs)`` contract:
    one optimizer step per ``gbs`` chunk, gradient accumulation over ``mbs`` micro-batches, global
    normalisers computed over the chunk (as NeMo-RL's workers do)."""

    def __init__(self, lr=0.5):
        torch.manual_seed(0)
        self.model = TinyLM().double()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.steps = 0
        self.metrics = []

    def logprobs(self, data):
        with torch.no_grad():
            logits = self.model(data["input_ids"])
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros(lp.shape[0], 1, dtype=lp.dtype), lp], 1)

    def train(self, data, loss_fn, eval_mode=False, gbs=None, mbs=None):
        b = data["input_ids"].shape[0]
        gbs, mbs = gbs or b, mbs or b
        losses = []
        for g0 in range(0, b, gbs):
            chunk = {k: v[g0 : g0 + gbs] for k, v in data.items()}
            gvt = (chunk["token_mask"][:, 1:] * chunk["sample_mask"][:, None]).sum()
            gvs = chunk["sample_mask"].sum()
            self.opt.zero_grad()
            total = 0.0
            for m0 in range(0, gbs, mbs):
                mb = {k: v[m0 : m0 + mbs] for k, v in chunk.items()}
                loss, metrics = loss_fn(self.model(mb["input_ids"]), mb, gvs, gvt)
                loss.backward()
                total += loss.item()
                self.metrics.append(metrics)
            self.opt.step()
            self.steps += 1
            losses.append(total)
        return {"loss": torch.tensor(losses), "grad_norm": torch.tensor(0.0), "all_mb_metrics": {}}


def _rollout(policy, seed=0, b=8, s=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, s), generator=g)
    data = dict(
        input_ids=ids,
        advantages=torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, s).clone(),
        token_mask=torch.cat([torch.zeros(b, 3), torch.ones(b, s - 3)], 1).double(),
        sample_mask=torch.ones(b, dtype=torch.float64),
    )
    data["prev_logprobs"] = policy.logprobs(data)
    data["generation_logprobs"] = data["prev_logprobs"].clone()
    data["reference_policy_logprobs"] = data["prev_logprobs"].clone()
    return data


def test_lopti_policy_with_real_tiny_model():
    loss_fn = LoptiClippedPGLossFn(_cfg(ratio_clip_min=0.2, ratio_clip_max=0.2))
    pol = TinyTorchPolicy()
    data = _rollout(pol)
    mask = data["token_mask"] * data["sample_mask"][:, None]
    low, high = lopti_masks(data["prev_logprobs"], mask, 0.12)  # ~1/V: both groups populated
    assert low.any() and high.any()

    # Expected first stage: one SGD step on the gradient of the low-group share of the loss.
    ref = copy.deepcopy(pol.model)
    ref_logits = ref(data["input_ids"])
    gvt = mask[:, 1:].sum()
    l_low, _ = loss_fn(ref_logits, dict(data, **{STAGE_MASK_KEY: low.double()}), torch.tensor(8.0), gvt)
    grads = torch.autograd.grad(l_low, list(ref.parameters()))
    expected_after_low = [p.detach() - 0.5 * g for p, g in zip(ref.parameters(), grads)]

    lopti = LoptiPolicy(pol, eta=0.12)
    calls = []
    orig_train = pol.train

    def spy(d, fn, **kw):
        calls.append([p.detach().clone() for p in pol.model.parameters()])
        return orig_train(d, fn, **kw)

    pol.train = spy
    out = lopti.train(data, loss_fn)
    after = [p.detach().clone() for p in pol.model.parameters()]

    assert pol.steps == 2  # twice the optimizer steps of a plain update
    # parameters entering stage 2 == one step on the low group's loss only
    for got, exp in zip(calls[1], expected_after_low):
        torch.testing.assert_close(got, exp)
    # stage 1 starts on-policy (ratio 1); stage 2 reuses the old log-probs, so its ratio has drifted
    # (NeMo-RL convention: metrics are normalised by global_valid_toks, so rescale to the stage's tokens)
    stage_ratio = [m["probs_ratio"] * float(gvt) / m["lopti_stage_tokens"] for m in pol.metrics]
    assert stage_ratio[0] == pytest.approx(1.0, abs=1e-7)
    assert abs(stage_ratio[1] - 1.0) > 1e-4
    assert pol.metrics[0]["lopti_stage_tokens"] == low[:, 1:].sum().item()
    assert pol.metrics[1]["lopti_stage_tokens"] == high[:, 1:].sum().item()
    assert any(not torch.equal(a, b) for a, b in zip(calls[1], after))
    assert set(out["lopti_stages"]) == {"low", "high"}

    # The surrogate improved: advantage-weighted log-likelihood of the sampled tokens went up.
    new_lp = pol.logprobs(data)
    obj = lambda lp: (data["advantages"] * lp * mask)[:, 1:].sum()  # noqa: E731
    assert obj(new_lp) > obj(data["prev_logprobs"])


def test_plain_policy_with_real_tiny_model_microbatches_match_full_batch():
    """Global normalisers make the micro-batched update equal to the full-batch update."""
    loss_fn = LoptiClippedPGLossFn(_cfg(advantage_reweight_alpha=0.3))
    a, b = TinyTorchPolicy(), TinyTorchPolicy()
    data = _rollout(a, seed=2)
    a.train(data, loss_fn, gbs=8, mbs=8)
    b.train(data, loss_fn, gbs=8, mbs=2)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb)
