"""`ray_dpo.core.losses` against TRL's own DPO loss code, on the same model outputs: values, gradients and metrics.

TRL 1.x has no standalone loss function: `DPOTrainer._compute_loss` runs here on a stub holding only the attributes it
reads, with TRL's own `DPOConfig` and preference collator. The policy and the reference are random float64 logits of
the batch's positions (`LogitsTable`): the gradients compared are those of the loss w.r.t. the model's outputs. TRL asks
for per-token log-probs through its fused LM head (`model(..., labels, fused_lm_head=True)`); `ExactLogProbs` answers
that call in float64, because TRL's own head accumulates in float32, and a 1e-6 float64 comparison would measure that
rounding instead of the loss. Our side scores the same logits as the trainer does: summed response log-probs.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

trl = pytest.importorskip("trl", reason="the check against TRL's own loss code needs TRL (the dev extra installs it)")

from trl import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402

from ray_dpo.core.losses import (  # noqa: E402
    F_DIVERGENCE_LOSSES,
    TRL_LOSS_TYPES,
    LossSpec,
    PairLogps,
    preference_loss,
)

PAD = 0
VOCAB = 61
TOL = 1e-6
SPREAD, NEAR = 2.5, 0.7  # logit scales: log-ratios of up to ~15 nats, or within ~4
TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class LogitsTable(nn.Module):
    """A causal LM reduced to its outputs: one learnable logit vector per position of the test batch. The loss and
    its gradients see exactly what they see from a real model's logits, without a transformer's forward and backward
    in every comparison."""

    def __init__(self, rows: int, columns: int, scale: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(scale * torch.randn(rows, columns, VOCAB, generator=g, dtype=torch.float64))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False):
        assert input_ids.shape == self.logits.shape[:2], "a table answers only the batch it was made for"
        return SimpleNamespace(logits=self.logits)


@functools.cache  # read-only here: both sides take gradients with autograd.grad, nothing accumulates in .grad
def policy_and_reference(scale: float) -> tuple[LogitsTable, LogitsTable]:
    """Policy and reference for `preference_batch()`, logits of std `scale`: SPREAD puts the losses in their nonlinear
    range, NEAR keeps forward_kl's exp(-log-ratio) scores finite in TRL's forms."""
    rows, columns = preference_batch()["input_ids"].shape
    policy, reference = (LogitsTable(rows, columns, scale, seed) for seed in (1, 2))
    return policy, reference.requires_grad_(False)


class ExactLogProbs(nn.Module):
    """TRL's fused-LM-head call, answered in float64 (or `dtype`): per-token log-probs of the next label, 0 where the
    label is -100, with the entropy, mean logit and top-1 fields TRL logs."""

    is_gradient_checkpointing = False

    def __init__(self, lm: nn.Module, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.lm, self.dtype = lm, dtype

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache=False):
        assert fused_lm_head
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        logps = logits.log_softmax(-1)
        token = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~scored, 0)
        entropy = -(logps.exp() * logps).sum(-1).masked_fill(~scored, 0)
        return SimpleNamespace(
            log_probs=token.to(self.dtype),
            entropy=entropy.detach(),
            mean_logits=logits.mean(-1).masked_fill(~scored, 0).detach(),
            is_top1=(logits.argmax(-1) == targets) & scored,
            aux_loss=None,
        )


class TRLLoss:
    """The attributes `DPOTrainer._compute_loss` reads, set as `DPOTrainer.__init__` sets them from a `DPOConfig`.
    TRL's loss code runs unchanged on it: one process, no accelerator."""

    _compute_loss = DPOTrainer._compute_loss

    def __init__(self, policy: nn.Module, reference: nn.Module, args: DPOConfig):
        self.model, self.ref_model, self.args = policy, reference, args
        identity = lambda t: t  # one process: gathering is the identity
        self.accelerator = SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity, unwrap_model=identity
        )
        self.beta = args.beta
        self.precompute_ref_logps = False
        self.loss_types = args.loss_type
        self.loss_weights = args.loss_weights or [1.0] * len(self.loss_types)
        self.ld_alpha = None
        self.f_divergence_type = args.f_divergence_type
        self.f_alpha_divergence_coef = args.f_alpha_divergence_coef
        self.label_smoothing = args.label_smoothing
        self.use_weighting = False
        self.aux_loss_enabled = False
        self._metrics = defaultdict(lambda: defaultdict(list))
        self._total_train_tokens = 0
        self._tp_size = 1


@functools.cache  # read-only
def preference_batch(seed: int = 0, pairs: int = 6) -> dict[str, Tensor]:
    """TRL's collator on random pairs: prompts of 2-5 tokens, responses of 1-7 (token 0 is padding)."""
    g = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=g).tolist()
    examples = [
        {"prompt_ids": randint(1, VOCAB, p), "chosen_ids": randint(1, VOCAB, c), "rejected_ids": randint(1, VOCAB, r)}
        for p, c, r in zip(randint(2, 6, pairs), randint(1, 8, pairs), randint(1, 8, pairs), strict=True)
    ]
    return DataCollatorForPreference(pad_token_id=PAD)(examples)


def pair_logps(policy: nn.Module, reference: nn.Module, batch: dict[str, Tensor], dtype: torch.dtype) -> PairLogps:
    """Our side: summed response log-probs and token counts from a plain forward of each model."""

    def sums(lm: nn.Module) -> tuple[Tensor, Tensor]:
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        scored = batch["completion_mask"][:, 1:].bool()
        token = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        return token.masked_fill(~scored, 0).to(dtype).sum(-1), scored.sum(-1)

    logps, tokens = sums(policy)
    with torch.no_grad():
        ref_logps, _ = sums(reference)
    (chosen, rejected), (chosen_tokens, rejected_tokens) = logps.chunk(2), tokens.chunk(2)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, *ref_logps.chunk(2))


def label_smoothing_for(loss_types: list[str]) -> float:
    if "exo_pair" in loss_types:
        return 1e-3  # the EXO paper's epsilon
    return 0.1 if {"robust", "aot", "aot_unpaired"} & set(loss_types) else 0.0  # TRL's sigmoid would ignore it


def run_both(
    loss_types, beta, f_divergence_type="reverse_kl", loss_weights=None, alpha=0.5, dtype=torch.float64, scale=SPREAD
):
    """TRL's loss and gradients, ours, and the metric differences, on one batch and one pair of models."""
    policy, reference = policy_and_reference(scale)
    batch = preference_batch()
    settings = dict(
        beta=beta,
        loss_type=list(loss_types),
        loss_weights=loss_weights,
        label_smoothing=label_smoothing_for(list(loss_types)),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=alpha,
    )
    args = DPOConfig(output_dir="/tmp/unused", report_to="none", use_cpu=True, **settings)
    trl_loss = TRLLoss(ExactLogProbs(policy, dtype), ExactLogProbs(reference, dtype), args)
    params = list(policy.parameters())
    theirs = trl_loss._compute_loss(trl_loss.model, batch, return_outputs=False)
    their_grads = torch.autograd.grad(theirs, params)
    out = preference_loss(LossSpec(**settings), pair_logps(policy, reference, batch, dtype))
    our_grads = torch.autograd.grad(out.loss, params)
    metric_diff = {k: abs(trl_loss._metrics["train"][k][0] - out.metrics[k].item()) for k in TRL_METRICS}
    assert out.loss.dtype == dtype
    return theirs, their_grads, out.loss, our_grads, metric_diff


def compare(loss_types, beta, **kwargs):
    """(value difference, max gradient difference relative to the largest gradient (absolute below 1), metric
    differences, value) of TRL's loss and ours."""
    theirs, their_grads, ours, our_grads, metric_diff = run_both(loss_types, beta, **kwargs)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(their_grads, our_grads, strict=True))
    grad_scale = max(a.abs().max().item() for a in their_grads)
    assert grad_scale > 0  # a loss that does not reach the model would pass trivially
    return abs(theirs.item() - ours.item()), grad_diff / max(1.0, grad_scale), metric_diff, theirs.item()


def check(loss_types, beta, tol=TOL, **kwargs) -> None:
    value_diff, grad_diff, metric_diff, value = compare(loss_types, beta, **kwargs)
    print(f"TRL {loss_types} beta={beta} {kwargs}: loss {value:.6g}, |diff| {value_diff:.2e}, grad {grad_diff:.2e}")
    assert value_diff <= tol * max(1.0, abs(value))
    assert grad_diff <= tol
    assert max(metric_diff.values()) <= tol, metric_diff


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_each_trl_loss_type_matches_trl(loss_type, beta):
    check([loss_type], beta)


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize(
    "loss_types, weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
        (["sigmoid", "ipo"], None),  # a summed loss and a length-normalised one: each keeps its own normalisation
        (["robust", "aot", "apo_zero", "sigmoid_norm"], [1.0, 0.5, 2.0, 0.25]),
    ],
)
def test_combinations_match_trl(loss_types, weights, beta):
    check(loss_types, beta, loss_weights=weights)


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSSES))
@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence"])
def test_f_divergences_match_trl(f_divergence_type, loss_type, beta):
    # forward_kl's scores grow as exp(-log-ratio): at 15 nats TRL's discopop is NaN (the next test), so it is
    # compared on log-ratios within ~4 nats
    scale = NEAR if f_divergence_type == "forward_kl" else SPREAD
    check([loss_type], beta, f_divergence_type=f_divergence_type, scale=scale)


def test_trl_forward_kl_discopop_is_nan_where_ours_is_finite():
    """TRL's sigmoid(z / tau) * exp(-z) is 0 * inf once forward_kl's scores make z << 0, even in float64."""
    theirs, their_grads, ours, our_grads, _ = run_both(["discopop"], 0.1, f_divergence_type="forward_kl")
    assert not all(torch.isfinite(g).all() for g in (theirs, *their_grads))
    assert all(torch.isfinite(g).all() for g in (ours, *our_grads))


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSSES))
def test_alpha_divergence_matches_trl_in_float32(loss_type, beta):
    """TRL runs alpha_divergence only up to float32 (see the next test): compared there, at float32's precision.
    alpha = 0.3, not the default 0.5, where TRL's alpha and the paper's 1 - alpha would coincide."""
    kwargs = dict(f_divergence_type="alpha_divergence", alpha=0.3, dtype=torch.float32, scale=NEAR)
    check([loss_type], beta, tol=2e-5, **kwargs)


def test_trl_has_no_float64_alpha_divergence():
    """TRL 1.16 looks the float64 clamp up in a table without it. When TRL fixes that, move alpha_divergence to the
    float64 comparison above."""
    with pytest.raises(KeyError):
        compare(["sigmoid"], 0.1, f_divergence_type="alpha_divergence", alpha=0.3)


def test_combination_with_an_f_divergence_matches_trl():
    check(["sigmoid", "ipo", "sft"], 0.5, f_divergence_type="js_divergence", loss_weights=[1.0, 0.3, 0.1])


def test_we_reject_f_divergences_for_the_losses_trl_rejects():
    """TRL 1.16's own list of the losses with an f-divergence form, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(DPOTrainer.__init__)))
    assigned = {
        node.targets[0].id: node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert ast.literal_eval(assigned["f_divergence_loss_types"]) == F_DIVERGENCE_LOSSES


# --- SimPO and ORPO against TRL's experimental CPO (loss_type="simpo") and ORPO trainers ------------------------------


def average_logps(seed: int = 0, pairs: int = 8) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    chosen_tokens, rejected_tokens = (
        torch.randint(1, 10, (pairs,), generator=g),
        torch.randint(1, 10, (pairs,), generator=g),
    )
    per_token = lambda: -(0.2 + 2.0 * torch.rand(pairs, generator=g, dtype=torch.float64))
    chosen, rejected = chosen_tokens * per_token(), rejected_tokens * per_token()
    return PairLogps(chosen.requires_grad_(), rejected.requires_grad_(), chosen_tokens, rejected_tokens)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    x = average_logps()
    cpu = SimpleNamespace(device=torch.device("cpu"))
    stub = SimpleNamespace(
        alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0, accelerator=cpu
    )
    mean_chosen, mean_rejected = x.chosen / x.chosen_tokens, x.rejected / x.rejected_tokens  # CPO averages per token
    theirs = CPOTrainer.cpo_loss(stub, mean_chosen, mean_rejected)[0].mean()
    ours = preference_loss(LossSpec("simpo", beta=beta, simpo_gamma=gamma), x).loss
    leaves = (x.chosen, x.rejected)
    assert abs(theirs.item() - ours.item()) <= TOL
    for a, b in zip(torch.autograd.grad(theirs, leaves), torch.autograd.grad(ours, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_orpo_odds_ratio_term_matches_trl_orpo_trainer():
    """TRL's ORPO computes its odds ratio in float32. Its NLL is the batch's token mean (as our `sft`); ours is each
    response's token mean, the ORPO paper's L_SFT, so only the odds-ratio term is TRL's."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    x, lam = average_logps(), 0.25
    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    mean_chosen, mean_rejected = x.chosen / x.chosen_tokens, x.rejected / x.rejected_tokens
    theirs = -ORPOTrainer.odds_ratio_loss(stub, mean_chosen, mean_rejected)[0].mean()
    ours = preference_loss(LossSpec("orpo", orpo_lambda=lam), x).loss + (x.chosen / x.chosen_tokens).mean()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    leaves = (x.chosen, x.rejected)
    for a, b in zip(torch.autograd.grad(theirs, leaves), torch.autograd.grad(ours, leaves), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
