"""NeMo-RL adapter: an AR/Lopti-aware clipped policy-gradient loss and a two-stage policy wrapper.

Method: Yang et al., "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs",
arXiv:2505.12929.  Framework: NVIDIA NeMo-RL (github.com/NVIDIA-NeMo/RL); this module follows the
loss-function protocol of its ``nemo_rl.algorithms`` package but contains no NeMo-RL code, and
imports NeMo-RL only opportunistically (to reuse its ``LossType`` / ``LossInputType`` enums when it is
installed).

* :class:`LoptiClippedPGLossFn` — a drop-in for NeMo-RL's ``ClippedPGLossFn``.  Same config keys
  (``ratio_clip_min``, ``ratio_clip_max``, ``ratio_clip_c``, ``reference_policy_kl_penalty``,
  ``reference_policy_kl_type``, ``kl_input_clamp_value``, ``kl_output_clamp_value``,
  ``token_level_loss``, ``use_on_policy_kl_approximation``, ``use_importance_sampling_correction``,
  ``truncated_importance_sampling_ratio``, ``disable_ppo_ratio``, ``force_on_policy_ratio``) plus
  ``advantage_reweight_alpha`` (AR, 0 = off) and ``lopti_eta`` (read by :class:`LoptiPolicy`;
  ``None`` = off).  With both off its loss is NeMo-RL's clipped PG loss.  It accepts both call styles:

  - up to v0.5: ``loss_fn(next_token_logits, data, global_valid_seqs, global_valid_toks,
    vocab_parallel_rank=None, vocab_parallel_group=None, context_parallel_group=None)``;
  - from v0.6 (``input_type = LOGPROB``): ``loss_fn(data=..., global_valid_seqs=...,
    global_valid_toks=..., next_token_logprobs=...)`` (or positionally with a ``[B, S-1]`` tensor).

* :class:`LoptiPolicy` — wraps a NeMo-RL policy; its ``train(data, loss_fn, ...)`` runs the update
  twice per rollout batch (low-probability tokens, then high-probability tokens, groups from
  ``data["prev_logprobs"]``), carrying the stage in ``data[STAGE_MASK_KEY]``.  ``token_mask`` is never
  modified, so NeMo-RL's ``global_valid_toks`` normaliser stays the full response mask.
"""

from __future__ import annotations

import copy
import enum
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_pma.rl.core import lopti_masks, pg_token_losses, reweight_advantages, taken_token_logprobs

__all__ = ["LoptiClippedPGLossFn", "LoptiPolicy", "STAGE_MASK_KEY", "LossType", "LossInputType"]

#: Key of the Lopti stage mask in NeMo-RL's ``BatchedDataDict`` (same layout as ``token_mask``:
#: ``[B, S]``, unshifted; the loss shifts it by one like every per-token field).
STAGE_MASK_KEY = "lopti_stage_mask"


def _nemo_rl_enums():
    for mod in ("nemo_rl.algorithms.loss.interfaces", "nemo_rl.algorithms.interfaces"):
        try:
            m = __import__(mod, fromlist=["LossType"])
        except Exception:  # noqa: BLE001 - NeMo-RL absent or broken: fall back to local enums
            continue
        return getattr(m, "LossType", None), getattr(m, "LossInputType", None)
    return None, None


_NRL_LOSS_TYPE, _NRL_INPUT_TYPE = _nemo_rl_enums()

if _NRL_LOSS_TYPE is not None:
    LossType = _NRL_LOSS_TYPE
else:

    class LossType(enum.Enum):  # type: ignore[no-redef]
        """Stand-in with NeMo-RL's values, used when NeMo-RL is not installed."""

        TOKEN_LEVEL = "token_level"
        SEQUENCE_LEVEL = "sequence_level"


if _NRL_INPUT_TYPE is not None:
    LossInputType = _NRL_INPUT_TYPE
else:

    class LossInputType(enum.Enum):  # type: ignore[no-redef]
        LOGIT = "logit"
        LOGPROB = "logprob"


def _masked_mean(values, mask, dim=None, normalizer=None):
    """NeMo-RL's reduction convention: ``sum(values * mask) / (normaliser + 1e-8)``, the normaliser
    being ``sum(mask)`` unless a global one is given."""
    norm = mask.sum(dim=dim) if normalizer is None else normalizer
    return (values * mask).sum(dim=dim) / (norm + 1e-8)


def _kl(logprobs, ref, kl_type, in_clamp, out_clamp):
    log_r = ref - logprobs
    if in_clamp is not None:
        log_r = log_r.clamp(min=-in_clamp, max=in_clamp)
    if kl_type == "k1":
        kl = -log_r
    elif kl_type == "k2":
        kl = log_r.square() / 2
    elif kl_type == "k3":
        kl = log_r.exp() - 1 - log_r
    else:
        raise ValueError(f"unknown reference_policy_kl_type {kl_type!r} (k1, k2 or k3)")
    if out_clamp is not None:
        kl = kl.clamp(min=-out_clamp, max=out_clamp)
    return kl


class LoptiClippedPGLossFn:
    """NeMo-RL clipped PG loss with Advantage Reweighting and Lopti stage masking (arXiv:2505.12929).

    Per token (after the one-position shift NeMo-RL applies to every per-token field)::

        A'   = (alpha * exp(prev_logprobs) + 1 - alpha) * A            (AR; alpha = 0: A' = A)
        r    = exp(curr_logprobs - prev_logprobs)
        pg   = max(-A' r, -A' clip(r, 1 - ratio_clip_min, 1 + ratio_clip_max))
        pg   = min(pg, -ratio_clip_c A')   where A' < 0                  (dual clip, if set)
        pg  *= exp(prev_logprobs - generation_logprobs)                  (if use_importance_sampling_correction)
        kl   = beta * w * KL_k(curr, reference)                          (w = exp(curr - gen) if on-policy approx.)
        loss = sum((pg + kl) * mask * stage) / global_valid_toks          (token level)

    where ``mask = token_mask * sample_mask`` and ``stage = data[STAGE_MASK_KEY]`` (all ones without
    Lopti): the normaliser is the whole response mask in both Lopti stages, as the paper prescribes.
    AR's ``pi_old`` is ``exp(prev_logprobs)``: the training policy's log-probs computed by GRPO before the
    update (fixed for the whole update, so applying AR inside the loss equals applying it once per batch).
    Sequence level: per-sequence mean over ``token_mask``, then sum over samples / ``global_valid_seqs``.
    """

    stage_mask_key = STAGE_MASK_KEY
    input_type = LossInputType.LOGPROB

    def __init__(self, cfg: Mapping[str, Any]):
        self.ratio_clip_min = float(cfg["ratio_clip_min"])
        self.ratio_clip_max = float(cfg["ratio_clip_max"])
        c = cfg.get("ratio_clip_c")
        if c is not None and c <= 0:  # some NeMo-RL versions use a non-positive value for "off"
            c = None
        if c is not None and not c > 1:
            raise ValueError(f"ratio_clip_c must be > 1 (or None to disable), got {c}")
        self.ratio_clip_c = c
        self.reference_policy_kl_penalty = float(cfg.get("reference_policy_kl_penalty", 0.0))
        self.reference_policy_kl_type = cfg.get("reference_policy_kl_type", "k3")
        self.kl_input_clamp_value = cfg.get("kl_input_clamp_value", None)
        self.kl_output_clamp_value = cfg.get("kl_output_clamp_value", None)
        self.use_on_policy_kl_approximation = bool(cfg.get("use_on_policy_kl_approximation", False))
        self.use_importance_sampling_correction = bool(cfg.get("use_importance_sampling_correction", False))
        self.truncated_importance_sampling_ratio = cfg.get("truncated_importance_sampling_ratio", None)
        tis_type = cfg.get("truncated_importance_sampling_type", None) or "tis"
        if self.truncated_importance_sampling_ratio is not None:
            if not self.use_importance_sampling_correction:
                raise ValueError("truncated_importance_sampling_ratio needs use_importance_sampling_correction")
            if tis_type != "tis":
                raise NotImplementedError(f"truncated_importance_sampling_type={tis_type!r}: only 'tis' is supported")
        self.disable_ppo_ratio = bool(cfg.get("disable_ppo_ratio", False))
        self.force_on_policy_ratio = bool(cfg.get("force_on_policy_ratio", False))
        if cfg.get("sequence_level_importance_ratios", False):
            raise NotImplementedError("sequence_level_importance_ratios (GSPO) is not supported with AR/Lopti")
        if cfg.get("use_cispo", False):
            raise NotImplementedError("use_cispo is not supported with AR/Lopti")
        self.token_level_loss = bool(cfg.get("token_level_loss", True))
        self.loss_type = LossType.TOKEN_LEVEL if self.token_level_loss else LossType.SEQUENCE_LEVEL
        self.advantage_reweight_alpha = float(cfg.get("advantage_reweight_alpha", 0.0) or 0.0)
        if not 0.0 <= self.advantage_reweight_alpha <= 1.0:
            raise ValueError("advantage_reweight_alpha must be in [0, 1]")
        eta = cfg.get("lopti_eta", None)
        if eta is not None and not 0.0 < float(eta) <= 1.0:
            raise ValueError("lopti_eta must be in (0, 1] or None")
        self.lopti_eta = None if eta is None else float(eta)

    # ------------------------------------------------------------------ log-probs
    @staticmethod
    def _logprobs_from_logits(logits, data, vocab_parallel_rank, vocab_parallel_group, context_parallel_group):
        if context_parallel_group is not None and dist.is_initialized() and dist.get_world_size(context_parallel_group) > 1:
            raise NotImplementedError(
                "context parallelism: use NeMo-RL >= 0.6, which hands the loss prepared log-probs (input_type=LOGPROB)"
            )
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - old torch
            DTensor = None
        if DTensor is not None and isinstance(logits, DTensor):
            raise NotImplementedError("DTensor logits: use NeMo-RL >= 0.6 (input_type=LOGPROB)")
        logits = logits.to(torch.float32)
        input_ids = data["input_ids"]
        seq = input_ids.shape[1]
        targets = input_ids[:, 1:].to(logits.device)
        if vocab_parallel_group is not None:
            if vocab_parallel_rank is None:
                raise ValueError("vocab_parallel_rank must be given with vocab_parallel_group")
            start = vocab_parallel_rank * logits.shape[-1]
            return taken_token_logprobs(logits[:, : seq - 1], targets, vocab_parallel_group, vocab_start=start)
        return taken_token_logprobs(logits[:, : seq - 1], targets)

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        next_token_logits: Optional[torch.Tensor] = None,
        data: Any = None,
        global_valid_seqs: Optional[torch.Tensor] = None,
        global_valid_toks: Optional[torch.Tensor] = None,
        vocab_parallel_rank: Optional[int] = None,
        vocab_parallel_group: Optional["dist.ProcessGroup"] = None,
        context_parallel_group: Optional["dist.ProcessGroup"] = None,
        *,
        next_token_logprobs: Optional[torch.Tensor] = None,
        logits: Optional[torch.Tensor] = None,
        **_unused: Any,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if data is None:
            raise TypeError("data is required")
        if logits is not None and next_token_logits is None:
            next_token_logits = logits
        if next_token_logprobs is None and next_token_logits is not None and next_token_logits.dim() == 2:
            next_token_logprobs, next_token_logits = next_token_logits, None  # v0.6 positional style
        if next_token_logprobs is not None:
            curr = next_token_logprobs
        elif next_token_logits is not None:
            curr = self._logprobs_from_logits(
                next_token_logits, data, vocab_parallel_rank, vocab_parallel_group, context_parallel_group
            )
        else:
            raise TypeError("pass next_token_logits (v0.5) or next_token_logprobs (v0.6)")
        return self.loss_from_logprobs(curr, data, global_valid_seqs, global_valid_toks)

    def loss_from_logprobs(self, curr, data, global_valid_seqs, global_valid_toks):
        """The loss given ``curr`` ``[B, S-1]`` log-probs of ``input_ids[:, 1:]``."""
        token_mask = data["token_mask"][:, 1:]
        sample_mask = data["sample_mask"]
        mask = token_mask * sample_mask.unsqueeze(-1)
        prev = data["prev_logprobs"][:, 1:]
        gen = data["generation_logprobs"][:, 1:] if "generation_logprobs" in data else prev
        adv = data["advantages"][:, 1:]
        if self.advantage_reweight_alpha > 0:
            adv = reweight_advantages(adv, prev, self.advantage_reweight_alpha)
        stage = data[STAGE_MASK_KEY][:, 1:].to(mask.dtype) if STAGE_MASK_KEY in data else None
        num_mask = mask if stage is None else mask * stage
        num_token_mask = token_mask if stage is None else token_mask * stage

        def reduce(values):
            if self.token_level_loss:
                return _masked_mean(values, num_mask, normalizer=global_valid_toks)
            per_seq = (values * num_token_mask).sum(-1) / (token_mask.sum(-1) + 1e-8)
            return _masked_mean(per_seq, sample_mask, normalizer=global_valid_seqs)

        # KL to the reference policy
        if self.reference_policy_kl_penalty != 0:
            ref = data["reference_policy_logprobs"][:, 1:]
            if self.use_on_policy_kl_approximation:
                w = torch.nan_to_num((curr - gen).exp().detach(), nan=0.0, posinf=0.0, neginf=0.0)
            else:
                w = torch.ones_like(curr)
            kl_tok = w * self.reference_policy_kl_penalty * _kl(
                curr, ref, self.reference_policy_kl_type, self.kl_input_clamp_value, self.kl_output_clamp_value
            )
            kl = reduce(kl_tok)
        else:
            kl = torch.zeros((), dtype=curr.dtype, device=curr.device)

        # clipped surrogate
        if self.force_on_policy_ratio:
            ratio = (curr - curr.detach()).exp()  # 1 in value, gradient of curr
            pg = -adv * ratio
            clipped = torch.zeros_like(mask, dtype=torch.bool)
            ratio_clamped = ratio
            if self.ratio_clip_c is not None:
                pg = torch.where(adv < 0, torch.minimum(pg, -adv * self.ratio_clip_c), pg)
        elif self.disable_ppo_ratio:
            ratio = ratio_clamped = curr
            pg = -adv * curr
            clipped = torch.zeros_like(mask, dtype=torch.bool)
            if self.ratio_clip_c is not None:
                pg = torch.where(adv < 0, torch.minimum(pg, -adv * self.ratio_clip_c), pg)
        else:
            pg, ratio, clipped, _ = pg_token_losses(
                curr - prev, adv, self.ratio_clip_min, self.ratio_clip_max, self.ratio_clip_c
            )
            ratio_clamped = ratio.clamp(1 - self.ratio_clip_min, 1 + self.ratio_clip_max)

        is_w = torch.nan_to_num((prev - gen).exp(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.truncated_importance_sampling_ratio is not None:
            is_w = is_w.clamp(max=self.truncated_importance_sampling_ratio)
        if self.use_importance_sampling_correction:
            pg = is_w * pg
        actor_loss = reduce(pg)
        loss = actor_loss + kl

        with torch.no_grad():
            m = num_mask
            vm = m.bool()
            metrics = {
                "loss": loss.item(),
                "actor_loss": actor_loss.item(),
                "kl_penalty": (kl.item() / self.reference_policy_kl_penalty) if self.reference_policy_kl_penalty else 0.0,
                "probs_ratio": _masked_mean(ratio.detach(), m, normalizer=global_valid_toks).item(),
                "probs_ratio_clamped": _masked_mean(ratio_clamped.detach(), m, normalizer=global_valid_toks).item(),
                "probs_ratio_min": ratio.detach()[vm].min().item() if vm.any() else float("inf"),
                "probs_ratio_max": ratio.detach()[vm].max().item() if vm.any() else float("-inf"),
                "clip_fraction": _masked_mean(clipped.to(m.dtype), m, normalizer=global_valid_toks).item(),
                "sampling_importance_ratio": _masked_mean(is_w, mask, normalizer=global_valid_toks).item(),
                "num_valid_samples": sample_mask.sum().item(),
                "lopti_stage_tokens": m.sum().item(),
            }
        return loss, metrics


class LoptiPolicy:
    """Lopti at NeMo-RL's ``policy.train`` level (arXiv:2505.12929, Sec. 4.2).

    ``LoptiPolicy(policy, eta).train(data, loss_fn, ...)`` calls ``policy.train`` twice with the same
    ``data`` (same ``prev_logprobs``; they are not recomputed in between) plus ``data[STAGE_MASK_KEY]``:
    first the tokens with ``exp(prev_logprobs) < eta``, then the rest (``low_first=False`` reverses the
    order, for ablations only).  Each call runs NeMo-RL's full mini-batch loop, so a rollout batch gets
    twice the optimizer steps.  ``token_mask`` is untouched.  The loss must honour the stage mask
    (:class:`LoptiClippedPGLossFn` does).  With ``eta=None`` it is a transparent pass-through.  Every
    other attribute is forwarded to the wrapped policy.

    The returned dict is the last stage's result with ``loss`` summed over the stages (each stage's loss
    is its group's share of the full-mask-normalised loss), ``all_mb_metrics`` concatenated, and the
    per-stage results under ``"lopti_stages"``.
    """

    def __init__(self, policy: Any, eta: Optional[float], *, low_first: bool = True, skip_empty: bool = False):
        if eta is not None and not 0.0 < float(eta) <= 1.0:
            raise ValueError("eta must be in (0, 1] or None")
        self._policy = policy
        self.eta = None if eta is None else float(eta)
        self.low_first = low_first
        self.skip_empty = skip_empty

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    @property
    def wrapped(self) -> Any:
        return self._policy

    def stage_masks(self, data: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        mask = data["token_mask"] * data["sample_mask"].unsqueeze(-1).to(data["token_mask"].dtype)
        low, high = lopti_masks(data["prev_logprobs"], mask, self.eta)
        stages = [("low", low), ("high", high)]
        return stages if self.low_first else stages[::-1]

    def train(self, data: Any, loss_fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.eta is None:
            return self._policy.train(data, loss_fn, *args, **kwargs)
        if STAGE_MASK_KEY in data:
            raise ValueError(f"data already has {STAGE_MASK_KEY!r}")
        results = []
        for name, stage in self.stage_masks(data):
            if self.skip_empty and not bool(stage.any()):
                continue
            staged = copy.copy(data)  # shallow: tensors shared, token_mask untouched
            staged[STAGE_MASK_KEY] = stage.to(data["token_mask"].dtype)
            out = self._policy.train(staged, loss_fn, *args, **kwargs)
            results.append((name, out))
        return self._combine(results)

    @staticmethod
    def _combine(results):
        if not results:
            return {}
        last = results[-1][1]
        if not isinstance(last, Mapping):
            return [r for _, r in results]
        merged = dict(last)
        if all(isinstance(r, Mapping) and "loss" in r for _, r in results):
            total = results[0][1]["loss"]
            for _, r in results[1:]:
                total = total + r["loss"]
            merged["loss"] = total
        mbs = [r.get("all_mb_metrics") for _, r in results if isinstance(r, Mapping)]
        if all(isinstance(m, Mapping) for m in mbs) and mbs:
            cat: dict = {}
            for m in mbs:
                for k, v in m.items():
                    cat.setdefault(k, []).extend(v if isinstance(v, list) else [v])
            merged["all_mb_metrics"] = cat
        merged["lopti_stages"] = {name: r for name, r in results}
        return merged
