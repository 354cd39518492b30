"""The preference-loss family: TRL 1.x's 15 loss types, their weighted combinations and f-divergences, and the
reference-free SimPO and ORPO. Pure torch on per-row quantities (one row = one preference pair): no model, no trainer.

    spec = LossSpec(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0))  # MPO
    out = preference_loss(spec, PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected))
    out.loss.backward()

Inputs are summed token log-probs of each response under the policy (and the reference) and the response token
counts. Each loss normalises as its paper and TRL do: ipo, sigmoid_norm, simpo and orpo divide by response lengths,
sft takes the mean over the batch's chosen tokens, the others use sums. So in ["sigmoid", "ipo"] each term keeps its
own scale. TRL's conventions are the defaults; `sigmoid_label_smoothing` and `reduction` keep ray_dpo's former ones.

Batch statistics. aot and aot_unpaired sort the batch, sft divides by its chosen-token count, and bco_pair's optional
reward shift averages its rewards. "The batch" is the GLOBAL batch of an optimizer step, every rank's rows and every
micro-batch, so the statistics come first, from detached rows, and each micro-batch's loss then uses them:

    everything, offset = gather_pairs(PairLogps.cat(micro_batches_without_grad))   # all ranks, concatenated
    stats = batch_stats(spec, everything, running)                                 # once per optimizer step
    out = preference_loss(spec, micro_batch, stats.rows(start, start + len(micro_batch)))  # start: its global row

Then the sum over micro-batches and ranks of `out.loss * out.count`, over the global row count, is the loss of the
whole batch, and its gradient is the whole batch's gradient: each row's term is differentiable w.r.t. that row alone.
Called without `stats`, the batch itself is the global batch. Metrics are means over the batch's rows with the same
count, so a weighted average over micro-batches and ranks keeps accuracies in [0, 1].

Everything runs in float64: the inputs are (B,) vectors, so it costs nothing, and the f-divergences' exponentials stay
finite where TRL's float32 forms overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ray_dpo.core.fdivergence import f_divergence_score
from ray_dpo.core.names import F_DIVERGENCES, LOSS_TYPES, TRL_LOSS_TYPES  # noqa: F401  (the names live there)

REFERENCE_FREE_LOSSES = frozenset({"sft", "simpo", "orpo"})  # no reference pass, no reference copy
# As TRL 1.16: the f-DPO reparameterisation leaves a beta * log Z(x) term that cancels only in the chosen-minus-rejected
# score difference, so the other losses (and the reference-free ones, with no ratio at all) have no f-divergence form.
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
LABEL_SMOOTHING_LOSSES = frozenset({"robust", "exo_pair", "aot", "aot_unpaired"})
BATCH_STAT_LOSSES = frozenset({"aot", "aot_unpaired", "sft"})  # and bco_pair with its reward shift
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class LossSpec:
    """Which losses, their weights and parameters; validated on construction (errors name the config option)."""

    loss_type: str | Sequence[str] = "sigmoid"  # one name or several; stored as a tuple
    loss_weights: Sequence[float] | None = None  # one per loss type; None = 1.0 each
    beta: float = 0.1
    label_smoothing: float = 0.0  # label-flip rate of robust, exo_pair (its epsilon), aot and aot_unpaired
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5  # TRL's alpha: f'(t) = (t^(alpha - 1) - 1) / (alpha - 1)
    discopop_tau: float = 0.05  # DiscoPOP's temperature of the log-ratio modulation (the paper's value)
    simpo_gamma: float = 0.5  # SimPO's target reward margin (TRL's CPO default; the paper tunes it with beta ~2)
    orpo_lambda: float = 0.1  # ORPO's weight of the odds-ratio term (the paper's lambda)
    bco_reward_shift: bool = False  # bco_pair subtracts the running mean reward (the BCO paper); TRL 1.x does not
    reference_free: bool = False  # losses that need a reference get log pi_ref = 0 (an implicit uniform reference)
    # ray_dpo's former behaviours, kept reachable:
    sigmoid_label_smoothing: bool = False  # sigmoid applies label_smoothing as cDPO (TRL's sigmoid ignores it)
    reduction: str | None = None  # "sum" / "mean": every loss sees summed / per-token log-probs, none normalises again

    def __post_init__(self) -> None:
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        weights = tuple(float(w) for w in self.loss_weights) if self.loss_weights is not None else (1.0,) * len(types)
        object.__setattr__(self, "loss_type", types)
        object.__setattr__(self, "loss_weights", weights)
        unknown = [t for t in types if t not in LOSS_TYPES]
        if not types or unknown:
            raise ValueError(f"dpo.loss_type must be one or more of {LOSS_TYPES}, got {list(types)}")
        if len(set(types)) != len(types):
            raise ValueError(f"dpo.loss_type lists a loss twice: {list(types)}; weigh it with dpo.loss_weights")
        if len(weights) != len(types) or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(
                f"dpo.loss_weights must be one finite weight >= 0 per loss type {list(types)}, got {weights}"
            )
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"dpo.f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
            raise ValueError(
                f"dpo.f_divergence_type={self.f_divergence_type!r} applies to {sorted(F_DIVERGENCE_LOSSES)} only, "
                f"not to {sorted(set(types) - F_DIVERGENCE_LOSSES)}: use 'reverse_kl' with them"
            )
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise ValueError(f"dpo.f_alpha_divergence_coef must be finite, got {self.f_alpha_divergence_coef}")
        self._check_label_smoothing(types)
        if not self.discopop_tau > 0:
            raise ValueError(f"dpo.discopop_tau must be > 0, got {self.discopop_tau}")
        if not (math.isfinite(self.simpo_gamma) and self.orpo_lambda >= 0):
            raise ValueError(
                f"dpo.simpo_gamma must be finite and dpo.orpo_lambda >= 0, got {self.simpo_gamma}, {self.orpo_lambda}"
            )
        if self.bco_reward_shift and "bco_pair" not in types:
            raise ValueError(f"dpo.bco_reward_shift=true needs 'bco_pair' in dpo.loss_type, got {list(types)}")
        if self.reduction not in (None, "sum", "mean"):
            raise ValueError(f"dpo.reduction must be 'sum', 'mean' or None (each loss its own), got {self.reduction!r}")

    def _check_label_smoothing(self, types: tuple[str, ...]) -> None:
        eps = self.label_smoothing
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {eps}")
        if "exo_pair" in types and eps == 0:
            raise ValueError("'exo_pair' needs dpo.label_smoothing > 0 (its epsilon; the EXO paper uses 1e-3)")
        if self.sigmoid_label_smoothing and "sigmoid" not in types:
            raise ValueError(f"dpo.sigmoid_label_smoothing=true needs 'sigmoid' in dpo.loss_type, got {list(types)}")
        users = set(types) & (LABEL_SMOOTHING_LOSSES | ({"sigmoid"} if self.sigmoid_label_smoothing else set()))
        if eps > 0 and not users:  # TRL would silently ignore it
            raise ValueError(
                f"dpo.label_smoothing={eps} has no effect on {list(types)}: it applies to "
                f"{sorted(LABEL_SMOOTHING_LOSSES)}, and to 'sigmoid' with dpo.sigmoid_label_smoothing=true (cDPO)"
            )

    @property
    def types(self) -> tuple[str, ...]:
        return self.loss_type  # type: ignore[return-value]  # a tuple once constructed

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights  # type: ignore[return-value]

    @property
    def needs_reference(self) -> bool:
        """False when no reference pass and no reference model are needed."""
        return not self.reference_free and not set(self.types) <= REFERENCE_FREE_LOSSES

    @property
    def needs_batch_stats(self) -> bool:
        """True when a loss reads statistics of the whole global batch (`batch_stats`): a trainer splitting the
        batch over micro-batches or ranks must compute them first."""
        return bool(set(self.types) & BATCH_STAT_LOSSES) or self.bco_reward_shift

    @property
    def needs_policy_scores(self) -> bool:
        """True when those statistics read the policy's log-probs (aot's sorts, bco_pair's mean reward), not only
        the response token counts (sft's token mean)."""
        return bool(set(self.types) & {"aot", "aot_unpaired"}) or self.bco_reward_shift

    @property
    def reward_reduction(self) -> str:
        """How the sequence log-probs in the rewards (`rewards/*`, an evaluation's implicit reward) are reduced: TRL's
        sums, or the legacy `reduction` when set, as the losses then see them."""
        return self.reduction or "sum"


@dataclass
class PairLogps:
    """Per-row inputs, each (B,). Sums and counts cover the scored response tokens only (no prompt, no padding)."""

    chosen: Tensor  # sum of log pi(token) over the chosen response, differentiable; -chosen is its NLL (sft, orpo)
    rejected: Tensor
    chosen_tokens: Tensor  # response token counts: length normalisation and sft's token mean
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None  # the same sums under the reference; None when no loss needs one
    ref_rejected: Tensor | None = None

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def detach(self) -> PairLogps:
        return PairLogps(*(None if t is None else t.detach() for t in self.columns()))

    @staticmethod
    def cat(parts: Sequence[PairLogps]) -> PairLogps:
        """Rows of several batches, in order (the micro-batches of one rank)."""
        columns = zip(*(p.columns() for p in parts), strict=True)
        return PairLogps(*(None if c[0] is None else torch.cat(c) for c in columns))

    def columns(self) -> tuple[Tensor | None, ...]:
        """The fields in declaration order (the constructor's), None where absent."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def _check(self, needs_reference: bool) -> None:
        if (self.ref_chosen is None) != (self.ref_rejected is None):
            raise ValueError("PairLogps: give both ref_chosen and ref_rejected, or neither")
        if needs_reference and self.ref_chosen is None:
            raise ValueError(
                "these loss types need reference log-probs (ref_chosen, ref_rejected); "
                "set reference_free=True for an implicit uniform reference"
            )
        shapes = {tuple(t.shape) for t in self.columns() if t is not None}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1 or len(self) == 0:
            raise ValueError(f"PairLogps fields must all be non-empty (B,) vectors, got shapes {sorted(shapes)}")


@dataclass
class RunningMean:
    """bco_pair's reward shift: the mean of every step's global-batch mean reward so far, as BCO's reference code
    (each step counts once). Checkpoint it with the optimizer: `dataclasses.asdict(running)`."""

    mean: float = 0.0
    count: int = 0

    def update(self, value: float) -> float:
        self.count += 1
        self.mean += (value - self.mean) / self.count
        return self.mean


@dataclass
class BatchStats:
    """What the batch-statistic losses take from the global batch. Per-row fields are in the global batch's row
    order; `rows(start, stop)` selects a micro-batch's. Detached: they are constants of the loss."""

    size: int  # rows covered
    aot_margin_partner: Tensor | None = None  # aot: the sorted reference margin meeting each row's policy margin
    aot_chosen_partner: Tensor | None = None  # aot_unpaired: the sorted rejected ratio meeting each chosen ratio
    aot_rejected_partner: Tensor | None = None  # aot_unpaired: the sorted chosen ratio meeting each rejected ratio
    chosen_tokens_mean: Tensor | None = None  # sft: chosen tokens per row, so that sum(nll) / tokens is a row mean
    bco_shift: Tensor | None = None  # bco_pair's reward shift

    def rows(self, start: int, stop: int) -> BatchStats:
        if not 0 <= start < stop <= self.size:
            raise ValueError(f"BatchStats.rows({start}, {stop}) outside the {self.size} rows they cover")
        per_row = ("aot_margin_partner", "aot_chosen_partner", "aot_rejected_partner")
        sliced = {k: getattr(self, k)[start:stop] for k in per_row if getattr(self, k) is not None}
        return replace(self, size=stop - start, **sliced)


@dataclass
class LossOutput:
    loss: Tensor  # () mean over the batch's rows of the weighted sum of the loss types' per-row terms
    row_losses: Tensor  # (B,) those per-row terms
    metrics: dict[str, Tensor] = field(default_factory=dict)  # METRICS, detached means over the batch's rows
    count: int = 0  # rows: weigh `loss` and `metrics` by it when averaging over micro-batches and ranks


@dataclass
class _Rows:
    """The per-row quantities the losses read, float64, after `reduction` and the f-divergence."""

    chosen: Tensor  # policy sequence log-probs
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_ratio: Tensor  # log pi - log pi_ref
    rejected_ratio: Tensor
    chosen_score: Tensor  # f'(pi / pi_ref): the ratio itself under reverse KL
    rejected_score: Tensor
    chosen_len: Tensor  # what the length-normalised losses divide by (1 under a legacy reduction)
    rejected_len: Tensor
    chosen_nll: Tensor  # NLL summed over the chosen tokens, whatever the reduction (sft)

    @property
    def score_margin(self) -> Tensor:
        return self.chosen_score - self.rejected_score


def _prepare(spec: LossSpec, batch: PairLogps) -> _Rows:
    batch._check(spec.needs_reference)
    f64 = lambda t: t.to(torch.float64)
    chosen, rejected = f64(batch.chosen), f64(batch.rejected)
    if spec.reference_free or batch.ref_chosen is None:  # None only when no loss needs it: rewards are beta * logps
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    else:
        ref_chosen, ref_rejected = f64(batch.ref_chosen), f64(batch.ref_rejected)
    chosen_len, rejected_len = f64(batch.chosen_tokens).clamp(min=1), f64(batch.rejected_tokens).clamp(min=1)
    nll = -chosen
    if spec.reduction == "mean":
        chosen, ref_chosen = chosen / chosen_len, ref_chosen / chosen_len
        rejected, ref_rejected = rejected / rejected_len, ref_rejected / rejected_len
    if spec.reduction is not None:
        chosen_len = rejected_len = torch.ones_like(chosen)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    score = lambda u: f_divergence_score(u, spec.f_divergence_type, spec.f_alpha_divergence_coef)
    return _Rows(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_ratio=chosen_ratio,
        rejected_ratio=rejected_ratio,
        chosen_score=score(chosen_ratio),
        rejected_score=score(rejected_ratio),
        chosen_len=chosen_len,
        rejected_len=rejected_len,
        chosen_nll=nll,
    )


# --- The losses: (spec, rows, stats) -> (B,) per-row terms ------------------------------------------------------------


def _cdpo(z: Tensor, eps: float) -> Tensor:
    """-log sigmoid(z) when the preference label is flipped with probability eps (cDPO, Mitchell 2023)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sigmoid(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:  # DPO (Rafailov et al. 2023), Eq. 7
    z = spec.beta * r.score_margin
    return _cdpo(z, spec.label_smoothing) if spec.sigmoid_label_smoothing else -F.logsigmoid(z)


def _hinge(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:  # SLiC (Zhao et al. 2023)
    return torch.relu(1 - spec.beta * r.score_margin)


def _ipo(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:
    # IPO (Azar et al. 2023), Eq. 17, on per-token scores: TRL's choice, confirmed by the IPO authors, so that beta
    # does not depend on response length
    margin = r.chosen_score / r.chosen_len - r.rejected_score / r.rejected_len
    return (margin - 1 / (2 * spec.beta)) ** 2


def _exo_pair(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:
    # EXO (Ji et al. 2024), Eq. 16 with K = 2: KL(softmax(beta * scores) || (1 - eps, eps))
    z, eps = spec.beta * r.score_margin, spec.label_smoothing
    chosen = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
    return chosen + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _nca_pair(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:  # NCA (Chen et al. 2024), pairwise
    chosen, rejected = spec.beta * r.chosen_ratio, spec.beta * r.rejected_ratio
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:
    # rDPO (Chowdhury et al. 2024), Eq. 8: unbiased under a label-flip rate eps
    z, eps = spec.beta * r.score_margin, spec.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(spec: LossSpec, r: _Rows, stats: BatchStats) -> Tensor:
    # BCO (Jung et al. 2024): chosen and rejected classified apart around a reward shift delta
    shift = _need(stats.bco_shift, "bco_pair's reward shift") if spec.bco_reward_shift else 0.0
    return -F.logsigmoid(spec.beta * r.chosen_ratio - shift) - F.logsigmoid(-(spec.beta * r.rejected_ratio - shift))


def _sppo_hard(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:
    # SPPO (Wu et al. 2024), Eq. 4.7 with hard probabilities: the winner's P = 1, the loser's 0
    return (r.chosen_ratio - 0.5 / spec.beta) ** 2 + (r.rejected_ratio + 0.5 / spec.beta) ** 2


def _aot(spec: LossSpec, r: _Rows, stats: BatchStats) -> Tensor:
    # AOT (Melnyk et al. 2024): distributional dominance, the sorted policy margins against the sorted reference ones
    partner = _need(stats.aot_margin_partner, "aot's sorted reference margins")
    return _cdpo(spec.beta * (r.chosen - r.rejected - partner), spec.label_smoothing)


def _aot_unpaired(spec: LossSpec, r: _Rows, stats: BatchStats) -> Tensor:
    # AOT, unpaired: sorted chosen ratios against sorted rejected ratios. A sorted position pairs two rows: the
    # chosen row's term carries the value, the rejected row's term only its gradient, so the rows sum to the loss.
    rejected_partner = _need(stats.aot_chosen_partner, "aot_unpaired's sort")
    chosen_partner = _need(stats.aot_rejected_partner, "aot_unpaired's sort")
    chosen = _cdpo(spec.beta * (r.chosen_ratio - rejected_partner), spec.label_smoothing)
    rejected = _cdpo(spec.beta * (chosen_partner - r.rejected_ratio), spec.label_smoothing)
    return chosen + (rejected - rejected.detach())


def _apo_zero(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:  # APO (D'Oosterlinck et al. 2024), Eq. 7
    return 1 - torch.sigmoid(spec.beta * r.chosen_ratio) + torch.sigmoid(spec.beta * r.rejected_ratio)


def _apo_down(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:  # APO, Eq. 8
    margin = r.chosen_ratio - r.rejected_ratio
    return torch.sigmoid(spec.beta * r.chosen_ratio) + 1 - torch.sigmoid(spec.beta * margin)


def _discopop(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:
    # DiscoPOP (Lu et al. 2024), Eq. 5: logistic and exponential losses mixed by sigmoid(z / tau). The exponential
    # term sigmoid(z / tau) * exp(-z) is taken in log space: for z << 0 TRL's form is 0 * inf = NaN.
    z, tau = spec.beta * r.score_margin, spec.discopop_tau
    return -F.logsigmoid(z) * (1 - torch.sigmoid(z / tau)) + torch.exp(F.logsigmoid(z / tau) - z)


def _sft(spec: LossSpec, r: _Rows, stats: BatchStats) -> Tensor:
    # NLL of the chosen responses, every token of the global batch weighing the same (TRL's token mean; RPO's term)
    return r.chosen_nll / _need(stats.chosen_tokens_mean, "sft's token count")


def _sigmoid_norm(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:  # DPO on per-token scores (TRL)
    return -F.logsigmoid(spec.beta * (r.chosen_score / r.chosen_len - r.rejected_score / r.rejected_len))


def _simpo(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:
    # SimPO (Meng et al. 2024), Eq. 6: reference-free, length-normalised rewards, target margin gamma
    margin = r.chosen / r.chosen_len - r.rejected / r.rejected_len
    return -F.logsigmoid(spec.beta * margin - spec.simpo_gamma)


def _orpo(spec: LossSpec, r: _Rows, _: BatchStats) -> Tensor:
    # ORPO (Hong et al. 2024), Eq. 6-8: per-token NLL of the chosen response + lambda * odds-ratio term, on
    # P(y | x) = exp(mean token log-prob); reference-free
    mean_chosen, mean_rejected = r.chosen / r.chosen_len, r.rejected / r.rejected_len
    return -mean_chosen - spec.orpo_lambda * F.logsigmoid(_log_odds(mean_chosen) - _log_odds(mean_rejected))


def _log_odds(logp: Tensor) -> Tensor:
    """log(p / (1 - p)) from log p: expm1 keeps 1 - p exact as p -> 1; a p of exactly 1 is capped below it."""
    logp = logp.clamp(max=-torch.finfo(logp.dtype).tiny)
    return logp - torch.log(-torch.expm1(logp))


def _need(value: Tensor | None, what: str) -> Tensor:
    if value is None:
        raise ValueError(f"the BatchStats lack {what}: compute them with batch_stats(spec, ...) for this spec")
    return value


_LOSSES: dict[str, Callable[[LossSpec, _Rows, BatchStats], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
    "simpo": _simpo,
    "orpo": _orpo,
}


# --- Batch statistics and the loss ------------------------------------------------------------------------------------


def batch_stats(spec: LossSpec, batch: PairLogps, running: RunningMean | None = None) -> BatchStats:
    """The statistics `spec`'s losses take from `batch`, which must be the GLOBAL batch (see the module docstring).
    Call once per optimizer step: it updates `running` (bco_pair's shift; None = this batch's mean reward alone)."""
    with torch.no_grad():
        stats = BatchStats(size=len(batch))
        if "sft" in spec.types:  # a batch without chosen tokens has no NLL either: 0 / 1, not 0 / 0
            tokens = batch.chosen_tokens.to(torch.float64).sum().clamp(min=1)
            stats.chosen_tokens_mean = tokens / len(batch)
        if not spec.needs_policy_scores:  # sft's count is all: `batch` may hold token counts alone
            return stats
        r = _prepare(spec, batch.detach())
        if "aot" in spec.types:
            stats.aot_margin_partner = _sorted_partner(r.chosen - r.rejected, r.ref_chosen - r.ref_rejected)
        if "aot_unpaired" in spec.types:
            stats.aot_chosen_partner = _sorted_partner(r.chosen_ratio, r.rejected_ratio)
            stats.aot_rejected_partner = _sorted_partner(r.rejected_ratio, r.chosen_ratio)
        if spec.bco_reward_shift:
            reward = (spec.beta * torch.cat((r.chosen_ratio, r.rejected_ratio))).mean().item()
            shift = running.update(reward) if running is not None else reward
            stats.bco_shift = torch.tensor(shift, dtype=torch.float64, device=r.chosen.device)
    return stats


def _sorted_partner(values: Tensor, others: Tensor) -> Tensor:
    """Sorting `values` and `others` and pairing them position by position, per row: the element of sorted(others)
    at the position row i takes in sorted(values). Stable: ties keep row order, the same on every rank."""
    order = torch.argsort(values, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(values), device=values.device)
    return torch.sort(others, stable=True).values[position]


def preference_loss(spec: LossSpec, batch: PairLogps, stats: BatchStats | None = None) -> LossOutput:
    """Weighted sum of `spec`'s losses, averaged over `batch`'s rows, and TRL's metrics over the same rows.

    `stats`: from `batch_stats` on the global batch, sliced to this batch's rows; None = `batch` is the global batch.
    The loss comes back in the policy log-probs' dtype (at least float32); it is computed in float64.
    """
    if stats is None:
        stats = batch_stats(spec, batch)
    elif stats.size != len(batch):
        raise ValueError(f"stats cover {stats.size} rows, the batch has {len(batch)}: pass stats.rows(start, stop)")
    r = _prepare(spec, batch)
    row_losses = sum(w * _LOSSES[t](spec, r, stats) for t, w in zip(spec.types, spec.weights, strict=True))
    dtype = torch.promote_types(batch.chosen.dtype, torch.float32)
    loss = row_losses.mean()
    with torch.no_grad():  # TRL's rewards are beta * log-ratios whatever the f-divergence
        chosen_rewards, rejected_rewards = spec.beta * r.chosen_ratio, spec.beta * r.rejected_ratio
        metrics = {
            "loss": loss,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(torch.float64).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": r.chosen.mean(),
            "logps/rejected": r.rejected.mean(),
        }
    metrics = {k: v.detach().to(dtype) for k, v in metrics.items()}
    return LossOutput(loss=loss.to(dtype), row_losses=row_losses.to(dtype), metrics=metrics, count=len(batch))


def gather_pairs(batch: PairLogps, group: dist.ProcessGroup | None = None) -> tuple[PairLogps, int]:
    """Every rank's rows, detached and in float64, concatenated in rank order, and the global row at which this
    rank's rows start. Ranks may hold different numbers of rows. Without torch.distributed: `batch` itself, 0."""
    if not (dist.is_available() and dist.is_initialized()):
        return batch.detach(), 0
    world, rank, device = dist.get_world_size(group), dist.get_rank(group), batch.chosen.device
    size = torch.tensor([len(batch)], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes, width = [int(s) for s in sizes], int(max(sizes))
    present = [t for t in batch.detach().columns() if t is not None]
    local = torch.zeros(len(present), width, dtype=torch.float64, device=device)  # all_gather wants equal shapes
    local[:, : len(batch)] = torch.stack([t.to(torch.float64) for t in present])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    columns = iter(torch.cat([g[:, :n] for g, n in zip(gathered, sizes, strict=True)], dim=1))
    everything = PairLogps(*(None if t is None else next(columns) for t in batch.columns()))
    return everything, sum(sizes[:rank])
