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
    # alpha from the environment (the fallback when the config names none)
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


def test_lopti_trainer_class_legacy_overrides_update_actor():
    """A legacy-style trainer (``_update_actor(batch)``): the stand-in first, then verl's real RayPPOTrainer."""
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    from megatron_pma.rl.verl import lopti_trainer_class

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
    assert issubclass(lopti_trainer_class(RayPPOTrainer, eta=0.5), RayPPOTrainer)


# ------------------------------------------------------------------------------------------ typed config


def _compose(*overrides):
    """verl's own ppo_trainer.yaml through Hydra, as ``python -m verl.trainer.main_ppo ...`` composes it."""
    import os

    import verl
    from hydra import compose, initialize_config_dir

    d = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=d, version_base=None):
        return compose("ppo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", *overrides])


def test_ar_alpha_through_verls_typed_config():
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass

    from megatron_pma.rl.verl_config import ARPolicyLossConfig

    cfg = _compose("+actor_rollout_ref.actor.policy_loss.ar_alpha=0.3")
    with pytest.raises(InstantiationException, match="ar_alpha"):  # verl's own PolicyLossConfig rejects the key
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    cfg = _compose(
        "actor_rollout_ref.actor.policy_loss._target_=megatron_pma.rl.verl_config.ARPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=ar",
        "+actor_rollout_ref.actor.policy_loss.ar_alpha=0.3",
    )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, FSDPActorConfig) and isinstance(actor.policy_loss, ARPolicyLossConfig)
    assert actor.policy_loss.ar_alpha == 0.3 and actor.policy_loss.loss_mode == "ar"

    old, cur, adv, mask = _inputs(seed=8)
    loss_fn = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)
    got, metrics = loss_fn(old, cur, adv, mask, actor.loss_agg_mode, actor)
    expect, expect_metrics = core_algos.get_policy_loss_fn("vanilla")(
        old, cur, reweight_advantages(adv, old, 0.3), mask, actor.loss_agg_mode, actor)
    torch.testing.assert_close(got, expect)
    assert metrics["actor/ar_alpha"] == 0.3 and expect_metrics.keys() <= metrics.keys()
    with pytest.raises(ValueError, match="ar_alpha"):
        ARPolicyLossConfig(ar_alpha=1.5)


# ------------------------------------------------------------------------------------------ V1 trainer


class MemoryTQ:
    """Stand-in for TransferQueue (a Ray-backed store that does not start here): one TensorDict of
    jagged per-sample fields, with TransferQueue's ``kv_batch_get`` / ``kv_batch_put`` calls."""

    def __init__(self, td):
        self.td = td
        self.puts = []

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        return self.td.select(*select_fields) if select_fields else self.td.copy()

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        self.puts.append(sorted(fields.keys()))
        self.td.update(fields)


class Meta:
    """Stand-in for TransferQueue's KVBatchMeta (keys, partition, extra_info)."""

    def __init__(self, n):
        self.keys = [f"k{i}" for i in range(n)]
        self.partition_id = "train"
        self.extra_info = {}

    def __len__(self):
        return len(self.keys)


class LossOnlyWorker:
    """Stand-in for the actor worker group: ``update_actor`` fetches the batch from the store as verl's
    worker does and evaluates verl's REAL actor loss (``verl.workers.utils.losses.ppo_loss``) on fixed
    log-probs and entropy (no optimizer step), normaliser ``batch_num_tokens`` from ``loss_mask`` as
    verl's engines compute it."""

    def __init__(self, tq, actor_cfg, log_probs, entropy, prompt_len):
        self.tq, self.cfg, self.lp, self.ent, self.p = tq, actor_cfg, log_probs, entropy, prompt_len
        self.losses = []

    def update_actor(self, batch):
        from tensordict import TensorDict
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.losses import ppo_loss

        td = self.tq.kv_batch_get(batch.keys, batch.partition_id).to_padded_tensor()
        b, r = td["response_mask"].shape
        data = TensorDict({
            "prompts": torch.ones(b, self.p, dtype=torch.long), "responses": torch.ones(b, r, dtype=torch.long),
            "attention_mask": torch.ones(b, self.p + r, dtype=torch.long), "response_mask": td["response_mask"],
            "old_log_probs": td["old_log_probs"], "advantages": td["advantages"], "ref_log_prob": td["ref_log_prob"],
        }, batch_size=b)
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=td["loss_mask"].sum().item(), global_batch_size=None)
        loss, _ = ppo_loss(self.cfg, {"log_probs": self.lp, "entropy": self.ent}, data)
        self.losses.append(loss)
        return {"metrics": {"loss": [loss.item()], "mfu": [0.0]}}


def _v1_setup(*overrides, b=4, r=6, p=3):
    from tensordict import TensorDict
    from verl.trainer.ppo.v1 import trainer_base
    from verl.utils.config import omega_conf_to_dataclass

    g = torch.Generator().manual_seed(21)
    lens = [r, r - 2, r, r - 1]
    nested = lambda rows: torch.nested.as_nested_tensor(rows, layout=torch.jagged)  # noqa: E731
    old = [-torch.rand(n, generator=g) * 3 for n in lens]
    store = TensorDict({
        "response_mask": nested([torch.ones(n) for n in lens]),
        "loss_mask": nested([torch.ones(n) for n in lens]),
        "old_log_probs": nested(old),
        "advantages": nested([torch.full((n,), float(torch.randn(1, generator=g))) for n in lens]),
        "ref_log_prob": nested([o + 0.3 * torch.randn(len(o), generator=g) for o in old]),
    }, batch_size=b)
    cfg = _compose("actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_coef=0.1",
                   "actor_rollout_ref.actor.entropy_coeff=0.01", "actor_rollout_ref.actor.policy_loss.loss_mode=ar",
                   "actor_rollout_ref.rollout.n=1", *overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    # the policy's current log-probs / entropy over the whole sequences (prompt + response), as the engine returns
    total = b * (p + r)
    theta = torch.zeros(total, requires_grad=True)
    padded_old = torch.cat([torch.nn.functional.pad(o, (0, r - len(o))) for o in old]).reshape(b, r)
    full = torch.zeros(b, p + r)
    full[:, p - 1 : p + r - 1] = padded_old + 0.2  # verl shifts model outputs left by one token
    lp = full.reshape(-1) + theta
    ent = (1.0 + 0.5 * theta.sin()).reshape(-1)
    tq = MemoryTQ(store)
    worker = LossOnlyWorker(tq, actor, lp, ent, p)
    return trainer_base, cfg, tq, worker, theta, Meta(b)


@pytest.fixture
def v1_trainer(monkeypatch):
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.trainer.ppo.v1 import trainer_base

    def make(cls, *overrides):
        tb, cfg, tq, worker, theta, meta = _v1_setup(*overrides)
        monkeypatch.setattr(trainer_base, "tq", tq)
        trainer = object.__new__(cls)  # verl's __init__ starts Ray worker groups: only its fields are set
        trainer.config, trainer.actor_rollout_wg = cfg, worker
        return trainer, tq, worker, theta, meta

    yield make, PPOTrainerSync


def test_v1_lopti_stages_add_up_and_mask_kl_and_entropy_by_group(v1_trainer):
    """verl's real V1 ``PPOTrainerSync._update_actor`` and real ``ppo_loss`` (PG with AR, k3 KL loss,
    entropy bonus), TransferQueue and the worker group stood in: the two stages' losses and gradients add up
    to the one-stage update's, so every term is masked by group and normalised over the full mask."""
    from megatron_pma.rl.verl import lopti_trainer_class

    make, sync = v1_trainer
    plain, tq, worker, theta, meta = make(sync)
    metrics = {}
    plain._update_actor(meta, metrics)
    (full_loss,) = worker.losses
    (full_grad,) = torch.autograd.grad(full_loss, theta)

    trainer, tq, worker, theta, meta = make(lopti_trainer_class(sync, eta=0.25))
    before = tq.td.copy()
    metrics = {}
    trainer._update_actor(meta, metrics)
    low, high = worker.losses
    torch.testing.assert_close(low + high, full_loss)
    grads = [torch.autograd.grad(x, theta, retain_graph=True)[0] for x in (low, high)]
    torch.testing.assert_close(grads[0] + grads[1], full_grad)
    assert low.abs() > 0 and high.abs() > 0
    old, mask = before["old_log_probs"].to_padded_tensor(0.0), before["response_mask"].to_padded_tensor(0.0)
    lo, hi = lopti_masks(old, mask, 0.25)
    assert metrics["lopti/low/tokens"] == int(lo.sum()) and metrics["lopti/high/tokens"] == int(hi.sum())
    assert metrics["lopti/low/actor/loss"] == pytest.approx(low.item()) and "actor/loss" in metrics
    # the store is as before: response_mask restored, loss_mask never written
    assert torch.equal(tq.td["response_mask"].to_padded_tensor(0.0), mask)
    assert all(fields == ["response_mask"] for fields in tq.puts) and len(tq.puts) == 3


def test_v1_plugin_wrap_reads_eta_from_verls_trainer_config(v1_trainer):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from megatron_pma.rl.verl import install_lopti_into_verl_trainer

    make, sync = v1_trainer
    originals = (PPOTrainer.__dict__["_update_actor"], RayPPOTrainer.__dict__["_update_actor"])
    try:
        assert install_lopti_into_verl_trainer() == {"v1": True, "legacy": False}
        trainer, tq, worker, theta, meta = make(sync)  # no lopti_eta: a pass-through
        trainer._update_actor(meta, {})
        assert len(worker.losses) == 1
        trainer, tq, worker, theta, meta = make(sync, "+trainer.v1.sync.lopti_eta=0.25")
        metrics = {}
        trainer._update_actor(meta, metrics)
        assert len(worker.losses) == 2 and "lopti/high/tokens" in metrics
        trainer, *_, meta = make(sync, "+trainer.v1.sync.lopti_eta=0.25", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean")
        with pytest.raises(ValueError, match="token-mean"):
            trainer._update_actor(meta, {})
        assert install_lopti_into_verl_trainer(0.5)["legacy"] and RayPPOTrainer._update_actor is not originals[1]
    finally:
        PPOTrainer._update_actor, RayPPOTrainer._update_actor = originals
    assert PPOTrainer._megatron_pma_original_update_actor.__qualname__ == "PPOTrainer._update_actor"  # verl's own


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
