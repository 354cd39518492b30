"""`ray_dpo.core.losses`: every loss in float64 against its paper's formula, written out here with elementary torch ops
(independently of the implementation), the options and their errors, float32 stability, and the global-batch contract
(micro-batches in one process, and 2 ranks over torch.distributed against 1 process)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ray_dpo.core.fdivergence import f_divergence_score
from ray_dpo.core.losses import (
    LOSS_TYPES,
    METRICS,
    TRL_LOSS_TYPES,
    LossSpec,
    PairLogps,
    RunningMean,
    batch_stats,
    gather_pairs,
    preference_loss,
)

F64 = torch.float64


def log_sigmoid(z: Tensor) -> Tensor:
    return torch.log(torch.sigmoid(z))  # the textbook form: fine in float64 for |z| < ~700


def rows(n: int = 12, seed: int = 0, spread: float = 5.0) -> PairLogps:
    """Random pairs: responses of 1-9 tokens at 0.5-3 nats each; the reference `spread` nats around the policy."""
    g = torch.Generator().manual_seed(seed)
    chosen_tokens, rejected_tokens = torch.randint(1, 10, (n,), generator=g), torch.randint(1, 10, (n,), generator=g)
    per_token = lambda: 0.5 + 2.5 * torch.rand(n, generator=g, dtype=F64)
    chosen, rejected = -chosen_tokens * per_token(), -rejected_tokens * per_token()
    noise = lambda: spread * torch.randn(n, generator=g, dtype=F64)
    return PairLogps(
        chosen.requires_grad_(),
        rejected.requires_grad_(),
        chosen_tokens,
        rejected_tokens,
        chosen.detach() + noise(),
        rejected.detach() + noise(),
    )


def paper_loss(
    name: str, x: PairLogps, beta: float, eps: float = 0.0, tau: float = 0.05, gamma: float = 0.5, lam: float = 0.1
) -> Tensor:
    """The papers' formulas, the batch mean. u = log pi - log pi_ref; Lc, Lr: response token counts."""
    c, r, rc, rr = x.chosen, x.rejected, x.ref_chosen, x.ref_rejected
    uc, ur = c - rc, r - rr
    Lc, Lr = x.chosen_tokens.to(F64), x.rejected_tokens.to(F64)
    h = uc - ur
    cdpo = lambda z: -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)  # Mitchell 2023
    if name == "sigmoid":  # Rafailov et al. 2023, Eq. 7
        per_row = -log_sigmoid(beta * h)
    elif name == "hinge":  # SLiC, Zhao et al. 2023
        per_row = torch.clamp(1 - beta * h, min=0)
    elif name == "ipo":  # Azar et al. 2023, Eq. 17, on per-token log-ratios (TRL, with the authors)
        per_row = (uc / Lc - ur / Lr - 1 / (2 * beta)) ** 2
    elif name == "exo_pair":  # Ji et al. 2024, Eq. 16: KL(softmax(beta u) || (1 - eps, eps))
        p = torch.softmax(beta * torch.stack((uc, ur), -1), -1)
        q = torch.tensor([1 - eps, eps], dtype=F64)
        per_row = (p * torch.log(p / q)).sum(-1)
    elif name == "nca_pair":  # Chen et al. 2024, pairwise NCA
        per_row = -log_sigmoid(beta * uc) - 0.5 * log_sigmoid(-beta * uc) - 0.5 * log_sigmoid(-beta * ur)
    elif name == "robust":  # Chowdhury et al. 2024, Eq. 8
        per_row = ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
    elif name == "bco_pair":  # Jung et al. 2024 (without the reward shift, as TRL 1.x)
        per_row = -log_sigmoid(beta * uc) - log_sigmoid(-beta * ur)
    elif name == "sppo_hard":  # Wu et al. 2024, Eq. 4.7 with P(winner) = 1
        per_row = (uc - 1 / (2 * beta)) ** 2 + (ur + 1 / (2 * beta)) ** 2
    elif name == "aot":  # Melnyk et al. 2024: sorted policy margins against sorted reference margins
        per_row = cdpo(beta * (torch.sort(c - r).values - torch.sort(rc - rr).values))
    elif name == "aot_unpaired":
        per_row = cdpo(beta * (torch.sort(uc).values - torch.sort(ur).values))
    elif name == "apo_zero":  # D'Oosterlinck et al. 2024, Eq. 7
        per_row = (1 - torch.sigmoid(beta * uc)) + torch.sigmoid(beta * ur)
    elif name == "apo_down":  # Eq. 8
        per_row = torch.sigmoid(beta * uc) + (1 - torch.sigmoid(beta * h))
    elif name == "discopop":  # Lu et al. 2024, Eq. 5
        mix = torch.sigmoid(beta * h / tau)
        per_row = (1 - mix) * -log_sigmoid(beta * h) + mix * torch.exp(-beta * h)
    elif name == "sft":  # NLL per chosen token of the batch
        return -c.sum() / Lc.sum()
    elif name == "sigmoid_norm":
        per_row = -log_sigmoid(beta * (uc / Lc - ur / Lr))
    elif name == "simpo":  # Meng et al. 2024, Eq. 6
        per_row = -log_sigmoid(beta / Lc * c - beta / Lr * r - gamma)
    elif name == "orpo":  # Hong et al. 2024, Eq. 6-8: odds(y) = P / (1 - P), P = exp(mean token log-prob)
        pc, pr = torch.exp(c / Lc), torch.exp(r / Lr)
        per_row = -c / Lc + lam * -log_sigmoid(torch.log((pc / (1 - pc)) / (pr / (1 - pr))))
    else:
        raise KeyError(name)
    return per_row.mean()


def spec_for(name: str, beta: float, **kwargs) -> LossSpec:
    eps = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(name, 0.0)
    return LossSpec(name, beta=beta, label_smoothing=eps, **kwargs)


def value_and_grads(loss: Tensor, x: PairLogps) -> tuple[float, Tensor, Tensor]:
    grad_chosen, grad_rejected = torch.autograd.grad(loss, (x.chosen, x.rejected), materialize_grads=True)
    return loss.item(), grad_chosen, grad_rejected


def assert_same(ours: Tensor, expected: Tensor, x: PairLogps, tol: float = 1e-10) -> None:
    value, *grads = value_and_grads(ours, x)
    value_ref, *grads_ref = value_and_grads(expected, x)
    assert value == pytest.approx(value_ref, rel=tol, abs=tol)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)
    assert any(g.abs().sum() > 0 for g in grads_ref)  # the loss reaches the policy: a 0 == 0 check would be vacuous


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("name", LOSS_TYPES)
def test_each_loss_matches_its_paper_in_float64(name, beta):
    x = rows()
    if name.startswith("aot"):  # sorting must pair rows differently from the batch order, or it tests nothing
        assert not torch.equal(torch.argsort(x.chosen - x.rejected), torch.argsort(x.ref_chosen - x.ref_rejected))
        assert not torch.equal(torch.argsort(x.chosen - x.ref_chosen), torch.argsort(x.rejected - x.ref_rejected))
    spec = spec_for(name, beta)
    out = preference_loss(spec, x)
    assert out.loss.dtype == F64 and out.count == len(x) and out.row_losses.shape == (len(x),)
    assert_same(out.loss, paper_loss(name, x, beta, eps=spec.label_smoothing), x)


def test_every_trl_loss_type_and_the_reference_free_ones_exist():
    assert len(TRL_LOSS_TYPES) == 15 and set(LOSS_TYPES) == set(TRL_LOSS_TYPES) | {"simpo", "orpo"}
    assert not LossSpec(["simpo", "orpo", "sft"]).needs_reference
    assert LossSpec(["simpo", "sigmoid"]).needs_reference
    assert not LossSpec("sigmoid", reference_free=True).needs_reference


def test_reference_free_losses_run_without_reference_and_others_get_an_implicit_uniform_one():
    x = rows()
    free = PairLogps(x.chosen, x.rejected, x.chosen_tokens, x.rejected_tokens)
    for name in ("simpo", "orpo", "sft"):
        assert_same(preference_loss(spec_for(name, 2.0), free).loss, paper_loss(name, x, 2.0), x)
    with pytest.raises(ValueError, match="reference log-probs"):
        preference_loss(LossSpec("sigmoid"), free)
    zero = torch.zeros_like(x.ref_chosen)
    uniform = PairLogps(x.chosen, x.rejected, x.chosen_tokens, x.rejected_tokens, zero, zero)
    ours = preference_loss(LossSpec("sigmoid", reference_free=True), free).loss
    assert_same(ours, paper_loss("sigmoid", uniform, 0.1), x)


def test_simpo_and_orpo_parameters():
    x = rows()
    ours = preference_loss(LossSpec("simpo", beta=2.5, simpo_gamma=1.4), x).loss
    assert_same(ours, paper_loss("simpo", x, 2.5, gamma=1.4), x)
    ours = preference_loss(LossSpec("orpo", orpo_lambda=0.5), x).loss
    assert_same(ours, paper_loss("orpo", x, 0.1, lam=0.5), x)


def test_combination_is_the_weighted_sum_each_loss_keeping_its_normalisation():
    x = rows()
    mpo = LossSpec(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    expected = 0.8 * paper_loss("sigmoid", x, 0.1) + 0.2 * paper_loss("bco_pair", x, 0.1) + paper_loss("sft", x, 0.1)
    assert_same(preference_loss(mpo, x).loss, expected, x)
    # sigmoid on summed log-ratios, ipo on per-token ones: neither takes the other's normalisation
    both = preference_loss(LossSpec(["sigmoid", "ipo"]), x).loss
    assert_same(both, paper_loss("sigmoid", x, 0.1) + paper_loss("ipo", x, 0.1), x)


# --- f-divergences ----------------------------------------------------------------------------------------------------


def paper_f_prime(u: Tensor, kind: str, alpha: float) -> Tensor:
    """f'(t), t = pi / pi_ref = exp(u), from the f-DPO paper (Wang et al. 2023, Table 1). Its alpha-divergence is
    (1 - t^-a) / a; TRL's coefficient is 1 - a."""
    t = torch.exp(u)
    if kind == "reverse_kl":
        return torch.log(t)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return torch.log(2 * t / (1 + t))
    a = 1 - alpha
    return (1 - t ** (-a)) / a


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.9, 1.7])
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores_match_the_paper(kind, alpha):
    u = torch.linspace(-30, 30, 61, dtype=F64)
    torch.testing.assert_close(f_divergence_score(u, kind, alpha), paper_f_prime(u, kind, alpha), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sigmoid_norm", "hinge", "robust", "exo_pair", "discopop"])
@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_losses_match_the_paper(kind, name):
    x = rows(spread=0.5)
    f = lambda u: paper_f_prime(u, kind, 0.3)
    # the pair losses read f'(t) where standard DPO reads log t: write each as its paper's formula on log-"ratios"
    # whose log is f'(t), with the policy carrying the scores and the reference 0
    zero = torch.zeros_like(x.ref_chosen)
    scores = f(x.chosen - x.ref_chosen), f(x.rejected - x.ref_rejected)
    scored = PairLogps(*scores, x.chosen_tokens, x.rejected_tokens, zero, zero)
    spec = spec_for(name, 0.5, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
    assert_same(preference_loss(spec, x).loss, paper_loss(name, scored, 0.5, eps=spec.label_smoothing), x)


def test_f_divergence_constants_count_once_ipo_divides_by_length():
    """TRL 1.16 keeps forward_kl's 1 and js's log 2 (1.9 dropped them): with unequal lengths, ipo sees them."""
    x = rows(spread=0.5)
    ours = preference_loss(LossSpec("ipo", f_divergence_type="js_divergence"), x).loss.item()
    uc, ur = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    Lc, Lr = x.chosen_tokens.to(F64), x.rejected_tokens.to(F64)
    without_constant = ((log_sigmoid(uc) / Lc - log_sigmoid(ur) / Lr - 1 / 0.2) ** 2).mean().item()
    assert abs(ours - without_constant) > 1e-3


def test_alpha_near_one_is_reverse_kl():
    x = rows()
    ours = preference_loss(LossSpec("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), x)
    assert_same(ours.loss, paper_loss("sigmoid", x, 0.1), x)


# --- Options and their errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(loss_type="dpo"), "dpo.loss_type"),
        (dict(loss_type=[]), "dpo.loss_type"),
        (dict(loss_type=["sigmoid", "sigmoid"]), "dpo.loss_type"),
        (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "dpo.loss_weights"),
        (dict(loss_weights=[-1.0]), "dpo.loss_weights"),
        (dict(loss_weights=[math.nan]), "dpo.loss_weights"),
        (dict(beta=0.0), "dpo.beta"),
        (dict(f_divergence_type="kl"), "dpo.f_divergence_type"),
        (dict(loss_type=["sigmoid", "bco_pair"], f_divergence_type="forward_kl"), r"not to \['bco_pair'\]"),
        (dict(loss_type="simpo", f_divergence_type="js_divergence"), "dpo.f_divergence_type"),
        (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=math.inf), "dpo.f_alpha_divergence_coef"),
        (dict(loss_type="robust", label_smoothing=0.5), "dpo.label_smoothing"),
        (dict(loss_type="exo_pair"), "dpo.label_smoothing > 0"),
        (dict(label_smoothing=0.1), "dpo.sigmoid_label_smoothing"),  # TRL's sigmoid would ignore it silently
        (dict(loss_type="ipo", sigmoid_label_smoothing=True), "dpo.sigmoid_label_smoothing"),
        (dict(discopop_tau=0.0), "dpo.discopop_tau"),
        (dict(orpo_lambda=-1.0), "dpo.orpo_lambda"),
        (dict(bco_reward_shift=True), "dpo.bco_reward_shift"),
        (dict(reduction="max"), "dpo.reduction"),
    ],
)
def test_invalid_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        LossSpec(**kwargs)


@pytest.mark.parametrize("name", ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"])
def test_f_divergences_are_rejected_where_trl_rejects_them(name):
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
        with pytest.raises(ValueError, match=f"not to \\['{name}'\\]"):
            spec_for(name, 0.1, f_divergence_type=kind)


def test_malformed_inputs_are_rejected():
    x = rows(4)
    with pytest.raises(ValueError, match="both ref_chosen and ref_rejected"):
        preference_loss(LossSpec(), PairLogps(x.chosen, x.rejected, x.chosen_tokens, x.rejected_tokens, x.ref_chosen))
    with pytest.raises(ValueError, match=r"\(B,\) vectors"):
        preference_loss(LossSpec(), PairLogps(x.chosen[:3], *list(x.columns())[1:]))
    with pytest.raises(ValueError, match="stats cover 4 rows"):
        preference_loss(LossSpec("aot"), rows(3), batch_stats(LossSpec("aot"), x))
    with pytest.raises(ValueError, match="BatchStats lack aot"):
        preference_loss(LossSpec("aot"), x, batch_stats(LossSpec("sigmoid"), x))
    with pytest.raises(ValueError, match="outside the 4 rows"):
        batch_stats(LossSpec("aot"), x).rows(2, 5)


def test_former_ray_dpo_behaviours_stay_reachable():
    """ray_dpo's former sigmoid applied label_smoothing as cDPO; its dpo.reduction ran every loss on summed or
    per-token log-probs; its rpo_alpha added alpha * the batch's per-token chosen NLL."""
    x, eps = rows(), 0.2
    uc, ur = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    h = uc - ur
    cdpo = (-(1 - eps) * log_sigmoid(0.1 * h) - eps * log_sigmoid(-0.1 * h)).mean()
    assert_same(preference_loss(LossSpec(label_smoothing=eps, sigmoid_label_smoothing=True), x).loss, cdpo, x)
    Lc, Lr = x.chosen_tokens.to(F64), x.rejected_tokens.to(F64)
    hinge_mean = torch.clamp(1 - 0.1 * (uc / Lc - ur / Lr), min=0).mean()
    assert_same(preference_loss(LossSpec("hinge", reduction="mean"), x).loss, hinge_mean, x)
    ipo_sum = ((h - 1 / 0.2) ** 2).mean()
    assert_same(preference_loss(LossSpec("ipo", reduction="sum"), x).loss, ipo_sum, x)
    mean = preference_loss(LossSpec("sigmoid", reduction="mean"), x)
    assert mean.metrics["logps/chosen"].item() == pytest.approx((x.chosen / Lc).mean().item(), rel=1e-12)
    rpo = -log_sigmoid(0.1 * h).mean() + 0.7 * -x.chosen.sum() / Lc.sum()
    assert_same(preference_loss(LossSpec(["sigmoid", "sft"], loss_weights=[1, 0.7]), x).loss, rpo, x)


# --- Edge cases and float32 stability ---------------------------------------------------------------------------------


def test_empty_responses_and_certain_tokens_stay_finite():
    x = rows(4)
    no_tokens = torch.zeros_like(x.chosen_tokens)
    empty = PairLogps(x.chosen * 0, x.rejected * 0, no_tokens, no_tokens, x.ref_chosen * 0, x.ref_rejected * 0)
    for name in LOSS_TYPES:
        out = preference_loss(spec_for(name, 0.1), empty)
        out.loss.backward(retain_graph=True)
        assert torch.isfinite(out.loss) and torch.isfinite(x.chosen.grad).all(), name
    sure = torch.zeros(2, dtype=F64, requires_grad=True)  # log P(chosen) = 0
    certain = PairLogps(sure, torch.full((2,), -3.0, dtype=F64), torch.tensor([2, 3]), torch.tensor([2, 3]))
    out = preference_loss(LossSpec("orpo"), certain)  # P(chosen) = 1: infinite odds, capped
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(certain.chosen.grad).all()


def test_dtypes_come_back_as_the_policy_logps_but_at_least_float32():
    x = rows(4)
    as_dtype = lambda dtype: PairLogps(*(t.detach().to(dtype) if t.is_floating_point() else t for t in x.columns()))
    assert preference_loss(LossSpec(), as_dtype(torch.float32)).loss.dtype == torch.float32
    bf16 = preference_loss(LossSpec(), as_dtype(torch.bfloat16))
    assert bf16.loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in bf16.metrics.values())


def margin_rows(chosen_ratio: float, rejected_ratio: float, dtype: torch.dtype) -> PairLogps:
    """One pair with the given log-ratios; the policy log-probs are the leaves."""
    chosen = torch.tensor([-50.0 + chosen_ratio], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-50.0 + rejected_ratio], dtype=dtype, requires_grad=True)
    ref = torch.tensor([-50.0], dtype=dtype)
    return PairLogps(chosen, rejected, torch.tensor([10]), torch.tensor([10]), ref, ref.clone())


def trl_discopop(z: Tensor, tau: float = 0.05) -> Tensor:  # TRL's form
    mix = torch.sigmoid(z / tau)
    return -torch.nn.functional.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def test_discopop_stays_finite_where_trls_form_is_nan():
    # beta * margin = -100: TRL's exp(100) overflows float32 while sigmoid(-2000) is 0, and 0 * inf is NaN
    x32, x64 = margin_rows(-500.0, 500.0, torch.float32), margin_rows(-500.0, 500.0, F64)
    theirs = trl_discopop(0.1 * ((x32.chosen - x32.ref_chosen) - (x32.rejected - x32.ref_rejected))).mean()
    assert torch.isnan(theirs)
    expected = trl_discopop(0.1 * ((x64.chosen - x64.ref_chosen) - (x64.rejected - x64.ref_rejected))).mean()
    assert torch.isfinite(expected)  # in float64 TRL's form still works here
    ours = preference_loss(LossSpec("discopop"), x32).loss
    value, *grads = value_and_grads(ours, x32)
    value_ref, *grads_ref = value_and_grads(expected, x64)
    assert value == pytest.approx(value_ref, rel=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-6, atol=1e-6)
    # beyond float64: beta * margin = -1000, TRL's form is NaN even in float64; the loss is -log sigmoid(-1000)
    far = margin_rows(-5000.0, 5000.0, F64)
    assert torch.isnan(trl_discopop(torch.tensor([-1000.0], dtype=F64))).all()
    ours = preference_loss(LossSpec("discopop"), far).loss
    ours.backward()
    assert ours.item() == pytest.approx(1000.0, rel=1e-12) and torch.isfinite(far.chosen.grad).all()


def test_forward_kl_stays_finite_where_trls_form_overflows():
    # the policy has pushed the rejected response 100 nats below the reference: TRL's 1 - exp(100) is -inf in float32,
    # the loss saturates to 0, and its backward multiplies 0 by inf
    x32, x64 = margin_rows(1.0, -100.0, torch.float32), margin_rows(1.0, -100.0, F64)

    def trl_sigmoid_forward_kl(x: PairLogps) -> Tensor:
        score = lambda u: 1 - torch.exp(-u)
        delta = score(x.chosen - x.ref_chosen) - score(x.rejected - x.ref_rejected)
        return -torch.nn.functional.logsigmoid(0.1 * delta).mean()

    theirs = trl_sigmoid_forward_kl(x32)
    assert not torch.isfinite(torch.autograd.grad(theirs, x32.rejected)[0]).all()
    ours = preference_loss(LossSpec(f_divergence_type="forward_kl"), x32).loss
    value, *grads = value_and_grads(ours, x32)
    value_ref, *grads_ref = value_and_grads(trl_sigmoid_forward_kl(x64), x64)  # float64 holds exp(100)
    assert value == pytest.approx(value_ref, abs=1e-12)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-6, atol=1e-12)
    # past float64's range too (exp(800)): finite, and still saturated
    far = margin_rows(1.0, -800.0, F64)
    ours = preference_loss(LossSpec(f_divergence_type="forward_kl"), far).loss
    ours.backward()
    assert ours.item() == 0.0 and torch.isfinite(far.rejected.grad).all()


def test_alpha_divergence_runs_in_float64_past_trls_float32_cap():
    """TRL clamps alpha's exponent at 80 in float32 (and has no float64 path); here (alpha - 1) * u = 105 is exact."""
    x = margin_rows(-150.0, -140.0, F64)
    ours = preference_loss(LossSpec("ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3), x)
    f = lambda u: paper_f_prime(u, "alpha_divergence", 0.3)
    expected = ((f(torch.tensor(-150.0, dtype=F64)) - f(torch.tensor(-140.0, dtype=F64))) / 10 - 5) ** 2
    assert ours.loss.item() == pytest.approx(expected.item(), rel=1e-12)


# --- Batch statistics: the global batch -------------------------------------------------------------------------------

GLOBAL_BATCH_SPECS = {
    "aot": dict(loss_type="aot", label_smoothing=0.1),
    "aot_unpaired": dict(loss_type="aot_unpaired", label_smoothing=0.1),
    "bco_pair shifted": dict(loss_type="bco_pair", bco_reward_shift=True),
    "MPO shifted": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], bco_reward_shift=True),
    "sft": dict(loss_type="sft"),
}


def accumulate(spec: LossSpec, parts: list[PairLogps], stats, start: int, total_rows: int) -> tuple[Tensor, dict]:
    """What a trainer does with micro-batches: each backpropagates loss * count / global rows; metric sums."""
    loss, metric_sums = torch.zeros((), dtype=F64), {k: 0.0 for k in METRICS}
    for part in parts:
        out = preference_loss(spec, part, stats.rows(start, start + len(part)))
        contribution = out.loss * out.count / total_rows
        contribution.backward()
        loss += contribution.detach()
        metric_sums = {k: metric_sums[k] + out.metrics[k].item() * out.count for k in METRICS}
        start += len(part)
    return loss, metric_sums


def split(x: PairLogps, sizes: list[int], start: int = 0) -> list[PairLogps]:
    """Consecutive row blocks of `x` from row `start`, each with its own leaves (as separate forward passes give)."""
    out = []
    for n in sizes:
        block = [t[start : start + n].detach().clone().requires_grad_(t.requires_grad) for t in x.columns()]
        out.append(PairLogps(*block))
        start += n
    return out


def part_grads(parts: list[PairLogps]) -> Tensor:
    """The gradients of every chosen log-prob, then of every rejected one, in row order (sft has none on rejected)."""
    grad = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)
    return torch.cat([torch.cat([grad(p.chosen) for p in parts]), torch.cat([grad(p.rejected) for p in parts])])


def whole_batch(spec: LossSpec, x: PairLogps, running: RunningMean | None = None):
    out = preference_loss(spec, x, batch_stats(spec, x, running))
    grads = torch.autograd.grad(out.loss, (x.chosen, x.rejected), materialize_grads=True)
    return out.loss.item(), torch.cat(grads), {k: v.item() for k, v in out.metrics.items()}


@pytest.mark.parametrize("name", GLOBAL_BATCH_SPECS)
def test_micro_batches_with_global_stats_equal_the_whole_batch(name):
    spec, x = LossSpec(**GLOBAL_BATCH_SPECS[name]), rows(12)
    loss, grads, metrics = whole_batch(spec, x)
    parts = split(x, [5, 4, 3])  # uneven, as a last micro-batch can be
    stats = batch_stats(spec, PairLogps.cat([p.detach() for p in parts]))
    micro_loss, metric_sums = accumulate(spec, parts, stats, 0, len(x))
    assert micro_loss.item() == pytest.approx(loss, rel=1e-12)
    torch.testing.assert_close(part_grads(parts), grads, rtol=1e-12, atol=1e-14)
    for k in METRICS:
        assert metric_sums[k] / len(x) == pytest.approx(metrics[k], rel=1e-12, abs=1e-14), k


def test_per_micro_batch_statistics_would_differ():
    """The test above can fail: sorting each micro-batch on its own (TRL's aot per device) is another loss."""
    spec, x = LossSpec("aot", label_smoothing=0.1), rows(12, seed=1)  # (seed 0's halves happen to sort alike)
    loss, _, _ = whole_batch(spec, x)
    parts = split(x, [6, 6])
    local = sum(preference_loss(spec, p).loss.item() * len(p) for p in parts) / len(x)
    assert abs(local - loss) > 1e-3


def test_metrics_averaged_over_micro_batches_stay_in_range():
    spec, x = LossSpec(), rows(12, seed=3)
    sizes = [1, 2, 4, 5]
    outs = [preference_loss(spec, p) for p in split(x, sizes)]
    accuracy = sum(o.metrics["rewards/accuracies"].item() * o.count for o in outs) / sum(o.count for o in outs)
    assert 0.0 < accuracy < 1.0 and all(0 <= o.metrics["rewards/accuracies"].item() <= 1 for o in outs)
    assert accuracy == pytest.approx(preference_loss(spec, x).metrics["rewards/accuracies"].item(), rel=1e-12)


def test_bco_reward_shift_is_the_running_mean_of_step_means():
    spec, running = LossSpec("bco_pair", bco_reward_shift=True), RunningMean()
    steps = [rows(8, seed=s) for s in range(3)]
    means = [0.1 * torch.cat((x.chosen - x.ref_chosen, x.rejected - x.ref_rejected)).mean().item() for x in steps]
    for i, x in enumerate(steps):
        stats = batch_stats(spec, x, running)
        assert stats.bco_shift.item() == pytest.approx(sum(means[: i + 1]) / (i + 1), rel=1e-12)
    shift = stats.bco_shift
    uc, ur = x.chosen - x.ref_chosen, x.rejected - x.ref_rejected
    expected = (-log_sigmoid(0.1 * uc - shift) - log_sigmoid(-(0.1 * ur - shift))).mean()  # the BCO paper's delta
    assert_same(preference_loss(spec, x, stats).loss, expected, x)


def test_sfts_statistics_need_only_the_token_counts():
    """A trainer gathers token counts alone when sft's token mean is the only statistic, even beside a loss that
    needs the reference (RPO: sigmoid + sft)."""
    x = rows(6)
    counts_only = PairLogps(torch.zeros(6), torch.zeros(6), x.chosen_tokens, x.rejected_tokens)
    spec = LossSpec(["sigmoid", "sft"])
    assert not spec.needs_policy_scores
    stats = batch_stats(spec, counts_only)
    assert stats.chosen_tokens_mean.item() == pytest.approx(x.chosen_tokens.double().mean().item(), rel=1e-15)
    assert_same(preference_loss(spec, x, stats).loss, preference_loss(spec, x).loss, x)


def test_gather_pairs_without_distributed_is_the_batch_itself():
    x = rows(5)
    everything, offset = gather_pairs(x)
    assert offset == 0 and torch.equal(everything.chosen, x.chosen.detach()) and not everything.chosen.requires_grad


# --- 2 ranks over torch.distributed (gloo, CPU) against 1 process -----------------------------------------------------

RANK_ROWS = [[3, 2], [4, 3]]  # micro-batch sizes per rank: uneven across ranks and micro-batches
STEPS = 2  # the running reward shift carries from step to step


def run_steps(spec: LossSpec, my_parts_for_step, total_rows: int) -> list[dict]:
    """This rank's view of STEPS optimizer steps: gather the global batch, its stats, then micro-batch losses."""
    running, results = RunningMean(), []
    for step in range(STEPS):
        parts = my_parts_for_step(step)
        everything, offset = gather_pairs(PairLogps.cat([p.detach() for p in parts]))
        stats = batch_stats(spec, everything, running)
        loss, metric_sums = accumulate(spec, parts, stats, offset, total_rows)
        summed = torch.tensor([loss.item(), *metric_sums.values()], dtype=F64)
        dist.all_reduce(summed)
        results.append({"sums": summed, "grads": part_grads(parts)})
    return results


def step_rows(step: int) -> PairLogps:
    return rows(sum(map(sum, RANK_ROWS)), seed=10 + step)


def gloo_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(RANK_ROWS))
    try:
        first_row = sum(map(sum, RANK_ROWS[:rank]))
        mine = lambda step: split(step_rows(step), RANK_ROWS[rank], start=first_row)
        total = sum(map(sum, RANK_ROWS))
        results = {name: run_steps(LossSpec(**kw), mine, total) for name, kw in GLOBAL_BATCH_SPECS.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_the_batch_split_equal_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(gloo_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=len(RANK_ROWS), join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(RANK_ROWS))]
    for name, kw in GLOBAL_BATCH_SPECS.items():
        spec, running = LossSpec(**kw), RunningMean()
        for step in range(STEPS):
            x = step_rows(step)
            loss, grads, metrics = whole_batch(spec, x, running)
            sums = ranks[0][name][step]["sums"]
            assert torch.equal(sums, ranks[1][name][step]["sums"])  # every rank sees the global numbers
            assert sums[0].item() == pytest.approx(loss, rel=1e-12), name
            for i, k in enumerate(METRICS, start=1):
                assert sums[i].item() / len(x) == pytest.approx(metrics[k], rel=1e-12, abs=1e-14), (name, k)
            # each rank's gradients are its rows' part of the whole batch's gradient
            got = [rank[name][step]["grads"].view(2, -1) for rank in ranks]  # (chosen, rejected) x this rank's rows
            torch.testing.assert_close(torch.cat(got, dim=1).view(-1), grads, rtol=1e-12, atol=1e-14)
