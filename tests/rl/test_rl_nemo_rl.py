"""``LoptiClippedPGLossFn`` / ``LoptiPolicy`` against the REAL NeMo-RL ``ClippedPGLossFn`` of v0.5.0, v0.6.0
and v0.7.0 (unmodified sources in ../shared/upstream, imported by tests/rl/nemo_rl_upstream.py; skipped
with the reason where that folder is absent).

v0.6+ losses are called the way NeMo-RL's workers call them: through the tag's own
``wrap_loss_fn_with_input_preparation`` + ``prepare_loss_input`` (logits -> next-token log-probs,
keyword call); v0.5 losses get logits positionally, as v0.5's DTensor worker passes them.
"""

import ast
import pickle

import pytest
import torch

from megatron_pma.rl.core import lopti_masks
from megatron_pma.rl.nemo_rl import STAGE_MASK_KEY, LoptiClippedPGLossFn, LoptiPolicy

from nemo_rl_upstream import TAGS, use

V = 11
PREFIX = "lopti/"


@pytest.fixture(scope="module", params=TAGS)
def nrl(request):
    with use(request.param) as n:
        n.loss_module  # import once per tag
        yield n


# ------------------------------------------------------------------------------------------ helpers


def _cfg(nrl, **over):
    """A complete NeMo-RL ``loss_fn`` config section (as in the tag's GRPO YAMLs) as a dict."""
    cfg = dict(
        ratio_clip_min=0.2,
        ratio_clip_max=0.28,
        ratio_clip_c=None,
        reference_policy_kl_penalty=0.0,
        reference_policy_kl_type="k3",
        kl_input_clamp_value=None,
        kl_output_clamp_value=None,
        use_on_policy_kl_approximation=False,
        use_importance_sampling_correction=False,
        truncated_importance_sampling_ratio=None,
        token_level_loss=True,
    )
    cfg.update(over)
    return cfg


def _real(nrl, cfg):
    """NeMo-RL's own loss, built as the tag's ``grpo.setup`` builds it."""
    mod = nrl.loss_module
    cfg = {k: v for k, v in cfg.items() if k not in ("advantage_reweight_alpha", "lopti_eta")}
    if hasattr(mod.ClippedPGLossConfig, "model_validate"):
        cfg = mod.ClippedPGLossConfig(**cfg)
    return mod.ClippedPGLossFn(cfg)


def _data(nrl, b=5, s=8, seed=0, spread=0.6):
    """A micro-batch in NeMo-RL's layout (per-token fields aligned with input_ids; position 0 unused)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, V, generator=g) * 2
    input_ids = torch.randint(0, V, (b, s), generator=g)
    lp_true = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    shifted = lambda x: torch.cat([torch.zeros(b, 1), x], 1)  # noqa: E731
    prev = shifted(lp_true + spread * torch.randn(b, s - 1, generator=g))
    gen = prev + 0.05 * torch.randn(b, s, generator=g)
    ref = prev + 0.4 * torch.randn(b, s, generator=g)
    token_mask = torch.zeros(b, s)
    token_mask[:, 2:] = 1
    token_mask[1, 6:] = 0
    sample_mask = torch.ones(b)
    sample_mask[2] = 0
    adv = torch.randn(b, 1, generator=g).expand(b, s).clone()
    batched = nrl.module("nemo_rl.distributed.batched_data_dict").BatchedDataDict
    data = batched(
        input_ids=input_ids,
        advantages=adv,
        prev_logprobs=prev,
        generation_logprobs=gen,
        reference_policy_logprobs=ref,
        token_mask=token_mask,
        sample_mask=sample_mask,
        rewards=(adv[:, 0] > 0).float(),  # v0.7's positive-example NLL reads it
    )
    return logits, data


def _norms(data, extra_toks=7.0, extra_seqs=2.0):
    """Global normalisers larger than this micro-batch's own counts, as with several micro-batches."""
    gvt = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]).sum() + extra_toks
    return data["sample_mask"].sum() + extra_seqs, gvt


def _call(nrl, fn, logits, data, gvs, gvt):
    """``fn``'s loss, metrics and gradient w.r.t. the logits, called as the tag's workers call a loss."""
    logits = logits.detach().clone().requires_grad_(True)
    if nrl.logprob_input:
        wrap = nrl.module("nemo_rl.algorithms.loss.wrapper").wrap_loss_fn_with_input_preparation
        prep = nrl.module("nemo_rl.algorithms.loss.utils").prepare_loss_input
        loss, metrics = wrap(logits, data, gvs, gvt, fn, prep)
    else:
        loss, metrics = fn(logits, data, gvs, gvt)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), metrics, grad


def _ours(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith(PREFIX)}


# Every option of the tag's ClippedPGLossFn worth covering: (id, overrides, first tag that has it, extra data)
CASES = [
    ("plain", {}, (0, 5), None),
    ("sequence_level", {"token_level_loss": False}, (0, 5), None),
    ("dual_clip", {"ratio_clip_c": 1.5}, (0, 5), None),
    ("k3_kl_clamped", {"reference_policy_kl_penalty": 0.05, "kl_input_clamp_value": 0.5, "kl_output_clamp_value": 0.05}, (0, 5), None),
    ("k1_kl_clamped_seq", {"reference_policy_kl_penalty": 0.05, "reference_policy_kl_type": "k1", "kl_input_clamp_value": 0.3,
                           "kl_output_clamp_value": 0.1, "token_level_loss": False}, (0, 5), None),
    ("on_policy_kl", {"reference_policy_kl_penalty": 0.05, "use_on_policy_kl_approximation": True}, (0, 5), None),
    ("is_correction", {"use_importance_sampling_correction": True, "ratio_clip_c": 2.0}, (0, 5), None),
    ("is_truncated", {"use_importance_sampling_correction": True, "truncated_importance_sampling_ratio": 1.02,
                      "truncated_importance_sampling_type": "tis"}, (0, 5), None),
    ("force_on_policy", {"force_on_policy_ratio": True, "reference_policy_kl_penalty": 0.02}, (0, 5), None),
    ("disable_ppo_ratio", {"disable_ppo_ratio": True}, (0, 5), None),
    ("gspo", {"token_level_loss": False, "sequence_level_importance_ratios": True, "use_importance_sampling_correction": True}, (0, 5), None),
    ("icepop", {"use_importance_sampling_correction": True, "truncated_importance_sampling_ratio": 1.05,
                "truncated_importance_sampling_ratio_min": 0.97, "truncated_importance_sampling_type": "icepop"}, (0, 6), None),
    ("unfiltered_kl", {"reference_policy_kl_penalty": 0.05, "use_on_policy_kl_approximation": True}, (0, 6), "unfiltered"),
    ("kl_in_reward", {"reference_policy_kl_penalty": 0.05, "use_kl_in_reward": True}, (0, 6), None),
    ("tis_min", {"use_importance_sampling_correction": True, "truncated_importance_sampling_ratio": 1.05,
                 "truncated_importance_sampling_ratio_min": 0.98, "truncated_importance_sampling_type": "tis"}, (0, 7), None),
    ("cispo", {"use_cispo": True}, (0, 7), None),
    ("positive_nll", {"positive_example_nll_weight": 0.1}, (0, 7), None),
]


def _case_data(nrl, extra, seed=0):
    logits, data = _data(nrl, seed=seed)
    if extra == "unfiltered":  # v0.6+: top-k/top-p sampling gives the KL term unfiltered log-probs
        g = torch.Generator().manual_seed(99)
        data["curr_logprobs_unfiltered"] = data["prev_logprobs"][:, 1:] + 0.3 * torch.randn(data["prev_logprobs"][:, 1:].shape, generator=g)
    return logits, data


# ------------------------------------------------------------------------------------------ AR/Lopti off


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_real_clipped_pg_loss_when_ar_and_lopti_off(nrl, case):
    name, over, since, extra = case
    if nrl.version[:2] < since:
        pytest.skip(f"{name}: not in NeMo-RL {nrl.tag}")
    cfg = _cfg(nrl, **over)
    logits, data = _case_data(nrl, extra)
    gvs, gvt = _norms(data)
    real_loss, real_metrics, real_grad = _call(nrl, _real(nrl, cfg), logits, data, gvs, gvt)
    fn = LoptiClippedPGLossFn({**cfg, "advantage_reweight_alpha": 0.0, "lopti_eta": None})
    loss, metrics, grad = _call(nrl, fn, logits, data, gvs, gvt)
    assert torch.equal(loss, real_loss)
    assert torch.equal(grad, real_grad)
    assert metrics == real_metrics  # no key added, none missing, same values
    assert real_grad.abs().sum() > 0
    assert fn.loss_type == _real(nrl, cfg).loss_type


def test_v06_positional_call_style(nrl):
    if not nrl.logprob_input:
        pytest.skip("v0.5 passes logits")
    cfg = _cfg(nrl, reference_policy_kl_penalty=0.01)
    logits, data = _data(nrl, seed=1)
    gvs, gvt = _norms(data)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
    expect = _real(nrl, cfg)(lp, data, gvs, gvt)
    got = LoptiClippedPGLossFn(cfg)(lp, data, gvs, gvt)
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1]
    assert LoptiClippedPGLossFn(cfg).input_type is nrl.module("nemo_rl.algorithms.loss.interfaces").LossInputType.LOGPROB


# ------------------------------------------------------------------------------------------ AR


@pytest.mark.parametrize("over", [{}, {"reference_policy_kl_penalty": 0.03, "use_importance_sampling_correction": True},
                                  {"force_on_policy_ratio": True}], ids=["plain", "kl_is", "force_on_policy"])
def test_ar_equals_real_loss_on_reweighted_advantages(nrl, over):
    alpha = 0.3
    cfg = _cfg(nrl, **over)
    logits, data = _data(nrl, seed=5)
    gvs, gvt = _norms(data, extra_toks=0.0)
    fn = LoptiClippedPGLossFn({**cfg, "advantage_reweight_alpha": alpha})
    frozen = data["advantages"].clone()
    got_loss, got_metrics, got_grad = _call(nrl, fn, logits, data, gvs, gvt)
    # pi_old: the training policy's log-probs before the update (the rollout's under force_on_policy_ratio)
    pi_old = data["generation_logprobs" if over.get("force_on_policy_ratio") else "prev_logprobs"].exp()
    weight = alpha * pi_old + 1 - alpha
    reweighted = data.copy()
    reweighted["advantages"] = data["advantages"] * weight
    loss, metrics, grad = _call(nrl, _real(nrl, cfg), logits, reweighted, gvs, gvt)
    torch.testing.assert_close(got_loss, loss)
    torch.testing.assert_close(got_grad, grad)
    assert _ours(got_metrics).keys() == metrics.keys()
    for k, v in metrics.items():
        assert got_metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    mask = data["token_mask"][:, 1:] * data["sample_mask"][:, None]
    assert got_metrics[PREFIX + "ar_weight_mean"] == pytest.approx(((weight[:, 1:] * mask).sum() / mask.sum()).item(), rel=1e-5)
    plain_loss = _call(nrl, _real(nrl, cfg), logits, data, gvs, gvt)[0]
    assert not torch.allclose(got_loss, plain_loss)
    assert torch.equal(data["advantages"], frozen)  # input not modified


# ------------------------------------------------------------------------------------------ Lopti stages


def test_two_stages_add_up_to_the_one_stage_loss(nrl):
    over = dict(reference_policy_kl_penalty=0.05, use_on_policy_kl_approximation=True, ratio_clip_c=1.5,
                use_importance_sampling_correction=True, truncated_importance_sampling_ratio=1.03,
                truncated_importance_sampling_type="tis")
    cfg = {**_cfg(nrl, **over), "advantage_reweight_alpha": 0.2, "lopti_eta": 0.3}
    fn = LoptiClippedPGLossFn(cfg)
    logits, data = _data(nrl, seed=7)
    gvs, gvt = _norms(data, extra_toks=0.0)
    full_loss, full_metrics, full_grad = _call(nrl, fn, logits, data, gvs, gvt)
    mask = data["token_mask"] * data["sample_mask"][:, None]
    low, high = lopti_masks(data["prev_logprobs"], mask, 0.3)
    assert low[:, 1:].any() and high[:, 1:].any()
    parts = []
    for stage in (low, high):
        staged = data.copy()
        staged[STAGE_MASK_KEY] = stage.float()
        parts.append(_call(nrl, fn, logits, staged, gvs, gvt))
        assert torch.equal(staged["token_mask"], data["token_mask"])  # the caller's mask untouched
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss)
    torch.testing.assert_close(parts[0][2] + parts[1][2], full_grad)
    for k, v in _ours(full_metrics).items():
        a, b = parts[0][1][k], parts[1][1][k]
        if k.endswith("_min"):
            assert min(a, b) == pytest.approx(v), k
        elif k.endswith("_max"):
            assert max(a, b) == pytest.approx(v), k
        elif k == "num_valid_samples":
            assert a == b == v
        elif k == "is_oob_ratio" and nrl.version < (0, 7):
            # v0.6 reports 1 - (in-bounds tokens / global_valid_toks) per call: not a sum over calls
            # (nor over micro-batches in NeMo-RL itself; v0.7 made it one)
            assert (1 - a) + (1 - b) == pytest.approx(1 - v, rel=1e-5, abs=1e-6), k
        else:  # every other NeMo-RL metric is a sum over tokens / global_valid_toks
            assert a + b == pytest.approx(v, rel=1e-5, abs=1e-6), k
    fracs = [p[1][PREFIX + "stage_token_frac"] for p in parts]
    assert sum(fracs) == pytest.approx(1.0) and 0 < fracs[0] < 1


def test_lopti_conflicts_are_one_clear_error_at_construction(nrl):
    conflicts = [({"token_level_loss": False}, "token_level_loss"), ({"force_on_policy_ratio": True}, "force_on_policy_ratio")]
    if nrl.version >= (0, 6):
        conflicts.append(({"use_importance_sampling_correction": True, "truncated_importance_sampling_ratio": 1.1,
                           "truncated_importance_sampling_ratio_min": 0.9, "truncated_importance_sampling_type": "seq-mask-tis"}, "seq-mask-tis"))
    if nrl.version >= (0, 7):
        conflicts.append(({"positive_example_nll_weight": 0.1}, "positive_example_nll_weight"))
    for over, word in conflicts:
        cfg = _cfg(nrl, **over)
        LoptiClippedPGLossFn(cfg)  # fine without Lopti
        with pytest.raises(ValueError, match=word):
            LoptiClippedPGLossFn({**cfg, "lopti_eta": 0.5})


def test_config_forms_and_validation(nrl):
    cfg = _cfg(nrl)
    fn = LoptiClippedPGLossFn({**cfg, "advantage_reweight_alpha": 0.2, "lopti_eta": 0.4})
    assert (fn.advantage_reweight_alpha, fn.lopti_eta) == (0.2, 0.4)
    assert type(fn.loss) is nrl.loss_module.ClippedPGLossFn
    assert LoptiClippedPGLossFn(cfg, advantage_reweight_alpha=0.1).advantage_reweight_alpha == 0.1
    config_cls = nrl.loss_module.ClippedPGLossConfig
    if hasattr(config_cls, "model_validate"):  # v0.7: the pydantic model, our keys as its extras
        model = config_cls(**cfg, advantage_reweight_alpha=0.25, lopti_eta=0.5)
        fn = LoptiClippedPGLossFn(model)
        assert (fn.advantage_reweight_alpha, fn.lopti_eta) == (0.25, 0.5)
        assert not (fn.loss.__dict__.keys() & {"advantage_reweight_alpha", "lopti_eta"})
    with pytest.raises(ValueError, match="advantage_reweight_alpha"):
        LoptiClippedPGLossFn({**cfg, "advantage_reweight_alpha": 1.5})
    with pytest.raises(ValueError, match="lopti_eta"):
        LoptiClippedPGLossFn({**cfg, "lopti_eta": 0.0})
    logits, data = _data(nrl)
    data[STAGE_MASK_KEY] = torch.ones_like(data["token_mask"])
    with pytest.raises(ValueError, match="lopti_eta"):
        _call(nrl, LoptiClippedPGLossFn(cfg), logits, data, *_norms(data))


def test_pickles_for_ray_workers(nrl):
    cfg = {**_cfg(nrl, reference_policy_kl_penalty=0.02), "advantage_reweight_alpha": 0.2}
    fn = LoptiClippedPGLossFn(cfg)
    again = pickle.loads(pickle.dumps(fn))
    logits, data = _data(nrl, seed=3)
    gvs, gvt = _norms(data)
    assert torch.equal(_call(nrl, fn, logits, data, gvs, gvt)[0], _call(nrl, again, logits, data, gvs, gvt)[0])


# ------------------------------------------------------------------------------------------ GRPO reads


def _loss_metric_reads(root):
    """Keys ``grpo_train`` / ``grpo_sync`` read from ``metrics[...]`` after merging the loss's micro-batch
    metrics, minus those GRPO itself stores, those it only reads behind an ``in metrics`` guard, and those
    the policy workers add (any key spelled in nemo_rl/models)."""
    reads, stores, guarded = set(), set(), set()
    for name in ("grpo.py", "grpo_sync.py"):
        path = root / "nemo_rl" / "algorithms" / name
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "metrics":
                if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                    (stores if isinstance(node.ctx, ast.Store) else reads).add(node.slice.value)
            elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In):
                if isinstance(node.left, ast.Constant) and getattr(node.comparators[0], "id", None) == "metrics":
                    guarded.add(node.left.value)
    worker_src = "\n".join(p.read_text() for p in (root / "nemo_rl" / "models").rglob("*.py"))
    worker = {k for k in reads if f'"{k}"' in worker_src or f"'{k}'" in worker_src}
    return reads - stores - guarded - worker


def test_every_metric_grpo_reads_from_the_loss_exists(nrl):
    needed = _loss_metric_reads(nrl.root)
    assert needed, "found no loss metric read by GRPO: the parser is broken"
    cfg = {**_cfg(nrl), "advantage_reweight_alpha": 0.2, "lopti_eta": 0.5}
    logits, data = _data(nrl)
    _, metrics, _ = _call(nrl, LoptiClippedPGLossFn(cfg), logits, data, *_norms(data))
    assert needed <= metrics.keys(), f"missing {sorted(needed - metrics.keys())}"


# ------------------------------------------------------------------------------------------ policy


class RecordingPolicy:
    """Stand-in for NeMo-RL's Ray-backed ``Policy`` (needs GPUs): records every ``train`` call and returns
    a result shaped like v0.5-v0.7 ``Policy.train``'s."""

    def __init__(self):
        self.calls = []
        self.some_attribute = "forwarded"

    def train(self, data, loss_fn, eval_mode=False, gbs=None, mbs=None, timer=None):
        self.calls.append(dict(data=data, loss_fn=loss_fn, eval_mode=eval_mode, gbs=gbs, mbs=mbs))
        n = len(self.calls)
        return {"loss": torch.tensor([float(n)]), "grad_norm": torch.tensor([0.1 * n]),
                "all_mb_metrics": {"loss": [n], PREFIX + "stage_token_frac": [0.25 * n]}}


def test_lopti_policy_runs_two_stages_with_fixed_groups(nrl):
    _, data = _data(nrl, seed=11)
    frozen = {k: v.clone() for k, v in data.items()}
    mask = data["token_mask"] * data["sample_mask"][:, None]
    eta = data["prev_logprobs"].exp()[mask.bool()].median().item()  # both groups populated
    inner = RecordingPolicy()
    pol = LoptiPolicy(inner, eta=eta)
    loss_fn = LoptiClippedPGLossFn({**_cfg(nrl), "lopti_eta": eta})
    out = pol.train(data, loss_fn, gbs=8, mbs=2)

    assert len(inner.calls) == 2
    low, high = lopti_masks(data["prev_logprobs"], mask, eta)
    for call, expect in zip(inner.calls, (low, high)):
        d = call["data"]
        assert call["loss_fn"] is loss_fn and call["gbs"] == 8 and call["mbs"] == 2
        assert torch.equal(d[STAGE_MASK_KEY].bool(), expect)
        assert d["token_mask"] is data["token_mask"]  # untouched: NeMo-RL's normalisers stay the batch's
        assert d["prev_logprobs"] is data["prev_logprobs"]  # not recomputed
    assert STAGE_MASK_KEY not in data
    for k, v in frozen.items():
        assert torch.equal(data[k], v)
    assert out["loss"].tolist() == [3.0] and out["grad_norm"].tolist() == pytest.approx([0.1, 0.2])
    m = out["all_mb_metrics"]
    assert m["loss"] == [1, 2]
    assert m[PREFIX + "low/stage_token_frac"] == [0.25] and m[PREFIX + "high/stage_token_frac"] == [0.5]
    assert m[PREFIX + "low/tokens"] == [int(low[:, 1:].sum())] and m[PREFIX + "high/tokens"] == [int(high[:, 1:].sum())]
    assert set(out["lopti_stages"]) == {"low", "high"} and pol.some_attribute == "forwarded"

    inner2 = RecordingPolicy()
    LoptiPolicy(inner2, eta=eta, low_first=False).train(data, loss_fn)
    assert torch.equal(inner2.calls[0]["data"][STAGE_MASK_KEY].bool(), high)
    inner3 = RecordingPolicy()
    LoptiPolicy(inner3, eta=None).train(data, loss_fn)
    assert len(inner3.calls) == 1 and inner3.calls[0]["data"] is data
    with pytest.raises(ValueError, match="lopti_eta"):
        LoptiPolicy(RecordingPolicy(), eta=eta).train(data, _real(nrl, _cfg(nrl)))  # would ignore the stages
    with pytest.raises(NotImplementedError, match="grpo_train"):
        LoptiPolicy(RecordingPolicy(), eta=eta).train_from_meta(None, loss_fn=loss_fn)


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
    """A real torch policy with NeMo-RL's ``train(data, loss_fn, eval_mode, gbs, mbs)`` contract: one
    optimizer step per ``gbs`` chunk, gradient accumulation over ``mbs`` micro-batches, global normalisers
    over the chunk from the untouched ``token_mask``, and the loss called as the tag's workers call it."""

    def __init__(self, nrl, lr=0.5):
        torch.manual_seed(0)
        self.nrl = nrl
        self.model = TinyLM()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.steps = 0
        self.metrics = []

    def logprobs(self, data):
        with torch.no_grad():
            logits = self.model(data["input_ids"])
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros(lp.shape[0], 1), lp], 1)

    def loss(self, loss_fn, mb, gvs, gvt):
        logits = self.model(mb["input_ids"])
        if self.nrl.logprob_input:
            wrap = self.nrl.module("nemo_rl.algorithms.loss.wrapper").wrap_loss_fn_with_input_preparation
            prep = self.nrl.module("nemo_rl.algorithms.loss.utils").prepare_loss_input
            return wrap(logits, mb, gvs, gvt, loss_fn, prep)
        return loss_fn(logits, mb, gvs, gvt)

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
                loss, metrics = self.loss(loss_fn, mb, gvs, gvt)
                loss.backward()
                total += loss.item()
                self.metrics.append(metrics)
            self.opt.step()
            self.steps += 1
            losses.append(total)
        return {"loss": torch.tensor(losses), "grad_norm": torch.tensor([0.0]), "all_mb_metrics": {}}


def _rollout(policy, seed=0, b=8, s=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, s), generator=g)
    data = dict(
        input_ids=ids,
        advantages=torch.randn(b, 1, generator=g).expand(b, s).clone(),
        token_mask=torch.cat([torch.zeros(b, 3), torch.ones(b, s - 3)], 1),
        sample_mask=torch.ones(b),
    )
    data["prev_logprobs"] = policy.logprobs(data)
    data["generation_logprobs"] = data["prev_logprobs"].clone()
    data["reference_policy_logprobs"] = data["prev_logprobs"].clone()
    return data


def test_lopti_policy_with_real_tiny_model(nrl):
    eta = 0.12  # ~1/V: both groups populated
    loss_fn = LoptiClippedPGLossFn({**_cfg(nrl, ratio_clip_max=0.2, reference_policy_kl_penalty=0.01), "lopti_eta": eta})
    pol = TinyTorchPolicy(nrl)
    data = _rollout(pol)
    mask = data["token_mask"] * data["sample_mask"][:, None]
    low, high = lopti_masks(data["prev_logprobs"], mask, eta)
    assert low.any() and high.any()

    # Expected first stage: one SGD step on the gradient of the low-group share of the loss.
    ref = TinyTorchPolicy(nrl)
    gvt = mask[:, 1:].sum()
    l_low, _ = ref.loss(loss_fn, dict(data, **{STAGE_MASK_KEY: low.float()}), torch.tensor(8.0), gvt)
    grads = torch.autograd.grad(l_low, list(ref.model.parameters()))
    expected_after_low = [p.detach() - 0.5 * g for p, g in zip(ref.model.parameters(), grads)]

    calls = []
    orig_train = pol.train

    def spy(d, fn, **kw):
        calls.append([p.detach().clone() for p in pol.model.parameters()])
        return orig_train(d, fn, **kw)

    pol.train = spy
    out = LoptiPolicy(pol, eta=eta).train(data, loss_fn)
    after = [p.detach().clone() for p in pol.model.parameters()]

    assert pol.steps == 2  # twice the optimizer steps of a plain update
    for got, exp in zip(calls[1], expected_after_low):
        torch.testing.assert_close(got, exp)
    # stage 1 starts on-policy (ratio 1); stage 2 reuses the old log-probs, so its ratio has drifted
    # (NeMo-RL's metrics are divided by global_valid_toks: divide by the stage's share for its mean)
    stage_ratio = [m["probs_ratio"] / m[PREFIX + "stage_token_frac"] for m in pol.metrics]
    assert stage_ratio[0] == pytest.approx(1.0, abs=1e-6)
    assert abs(stage_ratio[1] - 1.0) > 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(calls[1], after))
    assert out["all_mb_metrics"][PREFIX + "low/tokens"] == [int(low[:, 1:].sum())]
    new_lp = pol.logprobs(data)
    obj = lambda lp: (data["advantages"] * lp * mask)[:, 1:].sum()  # noqa: E731
    assert obj(new_lp) > obj(data["prev_logprobs"])  # the surrogate improved


def test_microbatches_match_full_batch_with_ar(nrl):
    """NeMo-RL's global normalisers make the micro-batched update equal the full-batch one, AR included."""
    loss_fn = LoptiClippedPGLossFn({**_cfg(nrl), "advantage_reweight_alpha": 0.3})
    a, b = TinyTorchPolicy(nrl), TinyTorchPolicy(nrl)
    data = _rollout(a, seed=2)
    a.train(data, loss_fn, gbs=8, mbs=8)
    b.train(data, loss_fn, gbs=8, mbs=2)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb)
