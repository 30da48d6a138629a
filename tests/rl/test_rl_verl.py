"""verl adapter tests against the real installed verl (skipped, with the reason, when it is absent).

Install recipe (CPU, keeps torch 2.13.0):
    echo torch==2.13.0 > /tmp/c.txt
    pip install --no-deps verl==0.9.1
    pip install -c /tmp/c.txt ray tensordict==0.10.0 omegaconf hydra-core codetiming pandas pyarrow \
        "transformers>=5.5.3,<5.11,!=5.6.0"
"""

import inspect

import pytest
import torch

try:
    from verl.trainer.ppo import core_algos
    from verl.workers.config.actor import FSDPActorConfig
except Exception as exc:  # noqa: BLE001
    pytest.skip(
        f"verl is not importable ({type(exc).__name__}: {exc}); install verl==0.9.1 as in this file's docstring",
        allow_module_level=True,
    )

from megatron_pma.rl.core import lopti_masks, reweight_advantages
from megatron_pma.rl.verl import (
    AR_ALPHA_ENV,
    apply_advantage_reweighting,
    lopti_two_stage_update,
    register_verl_policy_losses,
)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.delenv(AR_ALPHA_ENV, raising=False)
    register_verl_policy_losses()


def _config(**kw):
    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2, clip_ratio_high=0.28)
    base.update(kw)
    return FSDPActorConfig(**base)


def _inputs(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 4
    cur = old + 0.4 * torch.randn(b, t, generator=g)
    cur[0] = old[0] + 1.5  # ratio e^1.5 > clip_ratio_c = 3 ...
    cur = cur.clamp(max=0).requires_grad_()
    adv = torch.randn(b, 1, generator=g).expand(b, t).clone()
    adv[0] = -2.0  # ... with a negative advantage: the dual clip is active
    mask = torch.ones(b, t)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    return old, cur, adv, mask


def test_registered_and_signature_matches_verl():
    assert set(register_verl_policy_losses()) == {"ar", "vanilla_ar"}
    ours = core_algos.get_policy_loss_fn("ar")
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(vanilla).parameters)
    defaults = {k: p.default for k, p in inspect.signature(ours).parameters.items()}
    assert defaults["loss_agg_mode"] == "token-mean" and defaults["config"] is None
    assert defaults["rollout_is_weights"] is None


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"])
@pytest.mark.parametrize("with_is", [False, True])
def test_vanilla_ar_with_alpha_zero_equals_verl_vanilla(mode, with_is):
    old, cur, adv, mask = _inputs(seed=1)
    isw = torch.rand(old.shape) + 0.5 if with_is else None
    cfg = _config()
    l_ref, m_ref = core_algos.get_policy_loss_fn("vanilla")(old, cur, adv, mask, mode, cfg, isw)
    (g_ref,) = torch.autograd.grad(l_ref, cur)
    l_ours, m_ours = core_algos.get_policy_loss_fn("vanilla_ar")(old, cur, adv, mask, mode, cfg, isw)
    (g_ours,) = torch.autograd.grad(l_ours, cur)
    torch.testing.assert_close(l_ours, l_ref)
    torch.testing.assert_close(g_ours, g_ref)
    for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert m_ours[k] == pytest.approx(m_ref[k], abs=1e-7)
    assert m_ref["actor/pg_clipfrac_lower"] > 0  # the dual clip was exercised


def test_global_batch_info_is_honoured():
    old, cur, adv, mask = _inputs(seed=2)
    cfg = _config()
    cfg.global_batch_info.update(dp_size=2, batch_num_tokens=200)
    l_ref, _ = core_algos.get_policy_loss_fn("vanilla")(old, cur, adv, mask, "token-mean", cfg)
    l_ours, _ = core_algos.get_policy_loss_fn("vanilla_ar")(old, cur, adv, mask, "token-mean", cfg)
    torch.testing.assert_close(l_ours, l_ref)


def test_ar_equals_vanilla_on_reweighted_advantages(monkeypatch):
    old, cur, adv, mask = _inputs(seed=3)
    cfg = _config()
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    l_ar, m = core_algos.get_policy_loss_fn("ar")(old, cur, adv, mask, "token-mean", cfg)
    l_ref, _ = vanilla(old, cur, reweight_advantages(adv, old, 0.2), mask, "token-mean", cfg)
    torch.testing.assert_close(l_ar, l_ref)
    assert m["actor/ar_alpha"] == 0.2
    # alpha from the environment (how Ray workers get it)
    monkeypatch.setenv(AR_ALPHA_ENV, "0.5")
    l_env, _ = core_algos.get_policy_loss_fn("vanilla_ar")(old, cur, adv, mask, "token-mean", cfg)
    l_ref5, _ = vanilla(old, cur, reweight_advantages(adv, old, 0.5), mask, "token-mean", cfg)
    torch.testing.assert_close(l_env, l_ref5)
    plain, _ = vanilla(old, cur, adv, mask, "token-mean", cfg)
    assert not torch.allclose(l_env, plain)


def test_driver_side_ar_on_dataproto():
    from verl import DataProto

    old, _, adv, mask = _inputs(seed=4)
    batch = DataProto.from_dict(tensors={"old_log_probs": old, "advantages": adv, "response_mask": mask})
    out = apply_advantage_reweighting(batch, 0.3)
    torch.testing.assert_close(out.batch["advantages"], reweight_advantages(adv, old, 0.3))
    assert torch.equal(batch.batch["advantages"], adv)  # input untouched


def test_lopti_two_stage_update_with_dataproto_and_recording_update():
    from verl import DataProto

    old, _, adv, mask = _inputs(seed=5)
    batch = DataProto.from_dict(tensors={"old_log_probs": old, "advantages": adv, "response_mask": mask})
    seen = []

    def update_actor(b):
        seen.append(b)
        return DataProto(meta_info={"metrics": {"actor/pg_loss": float(len(seen))}})

    out = lopti_two_stage_update(batch, update_actor, eta=0.3)
    low, high = lopti_masks(old, mask, 0.3)
    assert low.any() and high.any() and len(seen) == 2
    torch.testing.assert_close(seen[0].batch["advantages"], adv * low)
    torch.testing.assert_close(seen[1].batch["advantages"], adv * high)
    for s in seen:
        assert torch.equal(s.batch["response_mask"], mask)  # normaliser unchanged
        assert torch.equal(s.batch["old_log_probs"], old)  # not recomputed
    assert torch.equal(batch.batch["advantages"], adv)
    m = out.meta_info["metrics"]
    assert m["lopti/low/actor/pg_loss"] == 1.0 and m["lopti/high/actor/pg_loss"] == 2.0
    seen.clear()
    lopti_two_stage_update(batch, update_actor, eta=None)
    assert len(seen) == 1 and seen[0] is batch


def test_lopti_with_real_tiny_model_and_verl_loss():
    """A real actor update (tiny torch policy, SGD) through verl's registry, two Lopti stages."""
    from verl import DataProto

    torch.manual_seed(0)
    b, t, v = 8, 6, 7
    model = torch.nn.Sequential(torch.nn.Embedding(v, 16), torch.nn.Tanh(), torch.nn.Linear(16, v))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.randint(0, v, (b, t + 1))

    def logp():
        lg = model(ids[:, :-1])
        return torch.log_softmax(lg, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    with torch.no_grad():
        old = logp()
    adv = torch.randn(b, 1).expand(b, t).clone()
    mask = torch.ones(b, t)
    batch = DataProto.from_dict(tensors={"old_log_probs": old, "advantages": adv, "response_mask": mask})
    cfg = _config()
    loss_fn = core_algos.get_policy_loss_fn("ar")
    steps = []

    def update_actor(db):
        opt.zero_grad()
        loss, metrics = loss_fn(db.batch["old_log_probs"], logp(), db.batch["advantages"], db.batch["response_mask"], "token-mean", cfg)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        steps.append(grads)
        return DataProto(meta_info={"metrics": {"actor/pg_loss": loss.item(), **metrics}})

    eta = old.exp().median().item()
    out = lopti_two_stage_update(batch, update_actor, eta=eta)
    assert len(steps) == 2
    low, high = lopti_masks(old, mask, eta)
    assert low.sum() > 0 and high.sum() > 0
    assert "lopti/low/actor/pg_loss" in out.meta_info["metrics"]
    with torch.no_grad():
        new = logp()
    obj = lambda lp: (reweight_advantages(adv, old, 0.2) * lp * mask).sum()  # noqa: E731
    assert obj(new) > obj(old)


def test_lopti_trainer_class_overrides_update_actor():
    """With a stand-in trainer class (verl's RayPPOTrainer module needs the GPU-side extras:
    torchdata, datasets, peft, ...), then with the real class when it imports."""
    from verl import DataProto

    from megatron_pma.rl.verl import install_lopti_into_verl_trainer, lopti_trainer_class

    class FakeTrainer:
        def __init__(self):
            self.seen = []

        def _update_actor(self, batch):
            self.seen.append(batch)
            return DataProto(meta_info={"metrics": {"actor/pg_loss": 1.0}})

    old, _, adv, mask = _inputs(seed=6)
    batch = DataProto.from_dict(tensors={"old_log_probs": old, "advantages": adv, "response_mask": mask})
    trainer = lopti_trainer_class(FakeTrainer, eta=0.3)()
    out = trainer._update_actor(batch)
    assert len(trainer.seen) == 2 and "lopti/high/actor/pg_loss" in out.meta_info["metrics"]

    try:
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    except ImportError as exc:
        pytest.skip(f"verl.trainer.ppo.ray_trainer not importable here ({exc}); stand-in checked")
    assert issubclass(lopti_trainer_class(eta=0.5), RayPPOTrainer)
    original = RayPPOTrainer._update_actor
    try:
        assert install_lopti_into_verl_trainer(0.5) and RayPPOTrainer._update_actor is not original
    finally:
        install_lopti_into_verl_trainer(None)
    assert RayPPOTrainer._update_actor is original


@pytest.mark.slow  # a fresh interpreter importing verl (+ ray, transformers): 5-60 s depending on load
def test_plugin_registers_through_verl_external_modules_env():
    import os
    import subprocess
    import sys

    code = "import verl\nfrom verl.trainer.ppo.core_algos import get_policy_loss_fn\nprint(get_policy_loss_fn('ar').__name__)"
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="megatron_pma.rl.verl_plugin")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ar_policy_loss" in out.stdout
