"""NeMo-RL adapter: AR and Lopti around NeMo-RL's OWN clipped policy-gradient loss.

Method: Yang et al., "Do Not Let Low-Probability Tokens Over-Dominate in RL for LLMs",
arXiv:2505.12929.  Framework: NVIDIA NeMo-RL (github.com/NVIDIA-NeMo/RL), v0.5.0 to v0.7.0.

* :class:`LoptiClippedPGLossFn` builds the installed NeMo-RL's ``ClippedPGLossFn`` and only transforms
  its inputs, so the loss, its gradient and every metric are NeMo-RL's on every release:

  - AR: ``advantages *= alpha * exp(pi_old_logprobs) + 1 - alpha`` per token, with ``pi_old`` the
    training policy's log-probs before the update (``prev_logprobs``; ``generation_logprobs`` under
    ``force_on_policy_ratio``, where v0.7 leaves ``prev_logprobs`` a zero placeholder);
  - Lopti stage: ``token_mask *= data[STAGE_MASK_KEY]``.  The global normalisers
    (``global_valid_toks`` / ``global_valid_seqs``) are computed by NeMo-RL's workers from the
    untouched ``token_mask`` of the full batch, so each stage is its group's share of the one-stage
    loss, KL term included (the official AR-Lopti code's behaviour).

  Its own metrics are added under ``lopti/``, normalised like NeMo-RL's (per micro-batch, divided by
  the global token count, so GRPO's sum over micro-batches gives the batch value).
* :class:`LoptiPolicy` wraps a NeMo-RL ``Policy``: ``train(data, loss_fn)`` runs the update twice
  (low-probability tokens, then the rest), carrying the stage in ``data[STAGE_MASK_KEY]``.

Both call styles are supported because the wrapper binds whatever it is called with to the wrapped
``ClippedPGLossFn.__call__`` signature: v0.5's ``loss_fn(next_token_logits, data, global_valid_seqs,
global_valid_toks, vocab_parallel_rank=..., ...)`` and v0.6+'s ``loss_fn(data=..., global_valid_seqs=...,
global_valid_toks=..., next_token_logprobs=...)``.  Attributes NeMo-RL reads from a loss
(``loss_type``, ``input_type``, ``reference_policy_kl_penalty``, ...) are the wrapped loss's.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any, Mapping, Optional

import torch

from megatron_pma.rl.core import lopti_masks, reweight_advantages

__all__ = ["LoptiClippedPGLossFn", "LoptiPolicy", "STAGE_MASK_KEY", "AR_ALPHA_KEY", "LOPTI_ETA_KEY"]

#: Key of the Lopti stage mask in NeMo-RL's ``BatchedDataDict`` (``[B, S]``, aligned with
#: ``token_mask``; NeMo-RL's sharding, micro-batching and sequence packing slice it like any per-token field).
STAGE_MASK_KEY = "lopti_stage_mask"
#: Our keys in NeMo-RL's ``loss_fn`` config section (v0.7's pydantic ``ClippedPGLossConfig`` allows extras).
AR_ALPHA_KEY = "advantage_reweight_alpha"
LOPTI_ETA_KEY = "lopti_eta"
_OUR_KEYS = (AR_ALPHA_KEY, LOPTI_ETA_KEY)
#: Prefix of the metrics this adapter adds to NeMo-RL's.
METRIC_PREFIX = "lopti/"


def _nemo_rl_loss_module():
    """The module holding the installed NeMo-RL's ``ClippedPGLossFn`` (v0.6+: ``algorithms.loss``;
    v0.5: ``algorithms.loss_functions``)."""
    try:
        return importlib.import_module("nemo_rl.algorithms.loss")
    except ModuleNotFoundError as err:
        if err.name == "nemo_rl":
            raise ImportError(
                "LoptiClippedPGLossFn wraps NeMo-RL's ClippedPGLossFn: run it where NeMo-RL v0.5-v0.7 is installed "
                "(e.g. the nvcr.io/nvidia/nemo-rl container)"
            ) from err
        if err.name != "nemo_rl.algorithms.loss":
            raise
    return importlib.import_module("nemo_rl.algorithms.loss_functions")


def _split_config(cfg: Any, config_cls: Any) -> tuple[Any, Any, Any]:
    """``(NeMo-RL config without our keys, alpha, eta)`` from a dict or a pydantic ``ClippedPGLossConfig``."""
    is_pydantic_cls = hasattr(config_cls, "model_validate")
    if hasattr(cfg, "model_dump"):  # v0.7 pydantic model; our keys are its extras
        extra = dict(cfg.model_extra or {})
        rest = {k: v for k, v in cfg.model_dump().items() if k not in _OUR_KEYS}
        inner = type(cfg).model_validate(rest)
        return inner, extra.get(AR_ALPHA_KEY), extra.get(LOPTI_ETA_KEY)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"loss config must be a mapping or NeMo-RL's ClippedPGLossConfig, got {type(cfg).__name__}")
    rest = {k: v for k, v in cfg.items() if k not in _OUR_KEYS}
    inner = config_cls.model_validate(rest) if is_pydantic_cls else rest
    return inner, cfg.get(AR_ALPHA_KEY), cfg.get(LOPTI_ETA_KEY)


def _lopti_conflicts(loss) -> list[str]:
    """NeMo-RL options whose normaliser is not the full batch's, so a Lopti stage (a restricted
    ``token_mask``) would change them, or that forbid a second update per rollout."""
    out = []
    if loss.loss_type.value != "token_level":
        out.append(
            "token_level_loss: false (the per-sequence mean divides by each sequence's own tokens, "
            "which a stage would change; this includes GSPO's sequence_level_importance_ratios)"
        )
    if getattr(loss, "force_on_policy_ratio", False):
        out.append("force_on_policy_ratio: true (needs exactly one update per rollout; Lopti makes two)")
    if (
        getattr(loss, "truncated_importance_sampling_ratio", None) is not None
        and getattr(loss, "truncated_importance_sampling_type", None) == "seq-mask-tis"
    ):
        out.append("truncated_importance_sampling_type: seq-mask-tis (a per-sequence mean over token_mask)")
    if getattr(loss, "positive_example_nll_weight", 0) > 0:
        out.append("positive_example_nll_weight > 0 (normalised by the micro-batch's own correct tokens)")
    return out


class LoptiClippedPGLossFn:
    """NeMo-RL's ``ClippedPGLossFn`` with Advantage Reweighting and a Lopti stage mask (arXiv:2505.12929).

    ``cfg`` is NeMo-RL's own ``loss_fn`` config (a dict on v0.5/v0.6; a ``ClippedPGLossConfig`` or a dict
    on v0.7) with two extra keys: ``advantage_reweight_alpha`` (AR strength in [0, 1]; 0 or absent = off)
    and ``lopti_eta`` (Lopti threshold in (0, 1]; ``None`` or absent = off).  The keyword arguments of the
    same names override the config.  With both off it IS NeMo-RL's loss (same object, same inputs).
    """

    stage_mask_key = STAGE_MASK_KEY

    def __init__(self, cfg: Any, *, advantage_reweight_alpha: Optional[float] = None, lopti_eta: Optional[float] = None):
        module = _nemo_rl_loss_module()
        inner_cfg, alpha, eta = _split_config(cfg, module.ClippedPGLossConfig)
        alpha = advantage_reweight_alpha if advantage_reweight_alpha is not None else alpha
        eta = lopti_eta if lopti_eta is not None else eta
        alpha = float(alpha or 0.0)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{AR_ALPHA_KEY} must be in [0, 1], got {alpha}")
        if eta is not None and not 0.0 < float(eta) <= 1.0:
            raise ValueError(f"{LOPTI_ETA_KEY} must be in (0, 1] or None, got {eta}")
        self.advantage_reweight_alpha = alpha
        self.lopti_eta = None if eta is None else float(eta)
        self.loss = module.ClippedPGLossFn(inner_cfg)
        if self.lopti_eta is not None:
            conflicts = _lopti_conflicts(self.loss)
            if conflicts:
                raise ValueError(f"{LOPTI_ETA_KEY} is set but Lopti cannot combine with: " + "; ".join(conflicts))
        self._signature = inspect.signature(self.loss.__call__)
        # pi_old for AR: v0.7 fills prev_logprobs with zeros under force_on_policy_ratio.
        self.pi_old_key = "generation_logprobs" if getattr(self.loss, "force_on_policy_ratio", False) else "prev_logprobs"

    def __getattr__(self, name: str) -> Any:
        # NeMo-RL reads loss_type, input_type, reference_policy_kl_penalty, ... from its loss.
        if name.startswith("__") or name in ("loss", "_signature"):
            raise AttributeError(name)
        return getattr(self.loss, name)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        bound = self._signature.bind(*args, **kwargs)
        data = bound.arguments["data"]
        gvt = bound.arguments.get("global_valid_toks")
        bound.arguments["data"], ours = self.prepare_data(data, gvt)
        loss, metrics = self.loss(*bound.args, **bound.kwargs)
        metrics.update(ours)
        return loss, metrics

    def prepare_data(self, data: Any, global_valid_toks: Optional[torch.Tensor] = None) -> tuple[Any, dict[str, float]]:
        """The data NeMo-RL's loss sees (AR-reweighted advantages, stage-restricted ``token_mask``; the
        input is not modified) and our ``lopti/`` metrics."""
        stage = data.get(STAGE_MASK_KEY)
        if stage is None and self.advantage_reweight_alpha == 0:
            return data, {}
        if stage is not None and self.lopti_eta is None:
            raise ValueError(f"data carries {STAGE_MASK_KEY!r} (LoptiPolicy) but the loss was built without {LOPTI_ETA_KEY}")
        out = copy.copy(data)  # shallow: BatchedDataDict / dict; tensors shared, never written in place
        token_mask = data["token_mask"]
        if stage is not None:
            del out[STAGE_MASK_KEY]
            token_mask = token_mask * stage.to(token_mask.dtype)
            out["token_mask"] = token_mask
        metrics: dict[str, float] = {}
        with torch.no_grad():
            mask = (token_mask[:, 1:] * data["sample_mask"].unsqueeze(-1)).to(torch.float32)
            norm = mask.sum() if global_valid_toks is None else global_valid_toks
            if stage is not None:
                metrics[METRIC_PREFIX + "stage_token_frac"] = (mask.sum() / (norm + 1e-8)).item()
        if self.advantage_reweight_alpha > 0:
            advantages = data["advantages"]
            pi_old_logprobs = data[self.pi_old_key]
            out["advantages"] = reweight_advantages(advantages, pi_old_logprobs, self.advantage_reweight_alpha)
            with torch.no_grad():
                weight = pi_old_logprobs[:, 1:].to(torch.float32).exp() * self.advantage_reweight_alpha
                weight = weight + (1.0 - self.advantage_reweight_alpha)
                metrics[METRIC_PREFIX + "ar_weight_mean"] = ((weight * mask).sum() / (norm + 1e-8)).item()
        return out, metrics


class LoptiPolicy:
    """Lopti at NeMo-RL's ``policy.train`` level (arXiv:2505.12929, Sec. 4.2).

    ``LoptiPolicy(policy, eta).train(data, loss_fn, ...)`` calls ``policy.train`` twice with the same
    ``data`` (same ``prev_logprobs``, not recomputed in between) plus ``data[STAGE_MASK_KEY]``: first the
    tokens with ``exp(prev_logprobs) < eta``, then the rest (``low_first=False`` reverses the order, for
    ablations only).  Each call runs NeMo-RL's full mini-batch loop, so a rollout batch gets twice the
    optimizer steps.  ``token_mask`` is untouched, so NeMo-RL's workers keep the full batch's
    normalisers.  ``loss_fn`` must be a :class:`LoptiClippedPGLossFn` built with the same ``lopti_eta``.
    With ``eta=None`` it is a transparent pass-through; every other attribute is the wrapped policy's.

    Result: the last stage's dict with ``loss`` summed over the stages (per global batch: each stage's
    loss is its group's share of the one-stage loss), ``grad_norm`` of every optimizer step of both
    stages, ``all_mb_metrics`` of both stages concatenated (GRPO sums most of them over micro-batches,
    which gives NeMo-RL's whole-batch value; counts such as ``num_valid_samples`` count each stage),
    our ``lopti/`` metrics per stage as ``lopti/low/...`` and ``lopti/high/...`` plus the group sizes
    ``lopti/low/tokens`` and ``lopti/high/tokens``, and the stage results under ``"lopti_stages"``.
    """

    def __init__(self, policy: Any, eta: Optional[float], *, low_first: bool = True, skip_empty: bool = False):
        if eta is not None and not 0.0 < float(eta) <= 1.0:
            raise ValueError("eta must be in (0, 1] or None")
        self._policy = policy
        self.eta = None if eta is None else float(eta)
        self.low_first = low_first
        self.skip_empty = skip_empty

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_policy":
            raise AttributeError(name)
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
        if getattr(loss_fn, "stage_mask_key", None) != STAGE_MASK_KEY or getattr(loss_fn, "lopti_eta", None) != self.eta:
            raise ValueError(
                f"LoptiPolicy(eta={self.eta}) needs a LoptiClippedPGLossFn built with {LOPTI_ETA_KEY}={self.eta} "
                f"(got {type(loss_fn).__name__} with {LOPTI_ETA_KEY}={getattr(loss_fn, 'lopti_eta', None)})"
            )
        if STAGE_MASK_KEY in data:
            raise ValueError(f"data already has {STAGE_MASK_KEY!r}")
        results = []
        for name, stage in self.stage_masks(data):
            if self.skip_empty and not bool(stage.any()):
                continue
            staged = copy.copy(data)  # shallow: tensors shared, token_mask untouched
            staged[STAGE_MASK_KEY] = stage.to(data["token_mask"].dtype)
            out = self._policy.train(staged, loss_fn, *args, **kwargs)
            results.append((name, out, int(stage[:, 1:].sum())))
        return self._combine(results)

    def train_from_meta(self, *args: Any, **kwargs: Any) -> Any:
        """v0.7's TransferQueue trainer (``grpo_sync``): the workers fetch the batch themselves, so no
        stage mask can be attached on the driver; AR (in the loss) works there, Lopti does not."""
        if self.eta is not None:
            raise NotImplementedError("Lopti needs grpo_train (data_plane.enabled: false); AR alone works with grpo_sync")
        return self._policy.train_from_meta(*args, **kwargs)

    @staticmethod
    def _combine(results):
        if not results:
            return {}
        last = results[-1][1]
        if not isinstance(last, Mapping):
            return [r for _, r, _ in results]
        merged = dict(last)
        outs = [r for _, r, _ in results]
        if all(isinstance(r, Mapping) and "loss" in r for r in outs):
            total = outs[0]["loss"]
            for r in outs[1:]:
                total = total + r["loss"]
            merged["loss"] = total
        if all(isinstance(r, Mapping) and torch.is_tensor(r.get("grad_norm")) for r in outs):
            merged["grad_norm"] = torch.cat([r["grad_norm"].reshape(-1) for r in outs])
        if all(isinstance(r, Mapping) and isinstance(r.get("all_mb_metrics"), Mapping) for r in outs):
            cat: dict = {}
            for name, r, tokens in results:
                for k, v in r["all_mb_metrics"].items():
                    if k.startswith(METRIC_PREFIX):
                        k = f"{METRIC_PREFIX}{name}/{k[len(METRIC_PREFIX):]}"
                    cat.setdefault(k, []).extend(v if isinstance(v, list) else [v])
                cat[f"{METRIC_PREFIX}{name}/tokens"] = [tokens]
            merged["all_mb_metrics"] = cat
        merged["lopti_stages"] = {name: r for name, r, _ in results}
        return merged
