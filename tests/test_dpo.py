import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ray_dpo.core.dpo import DPO, sequence_logps, token_logps
from ray_dpo.core.losses import LossSpec, PairLogps, preference_loss
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.pairs import response_mask, response_mask_from_lengths


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_loss(pc, pr, rc, rr, beta, loss_type, eps, lc=1, lr=1):
    """Per-pair loss written out from the papers, on Python floats (float64); lc, lr: response token counts."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":  # on per-token log-ratios
        return ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "sppo_hard":
        return (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        a, b = beta * (pc - rc), beta * (pr - rr)
        return -logsigmoid(a) - 0.5 * logsigmoid(-a) - 0.5 * logsigmoid(-b)
    raise AssertionError(loss_type)


@pytest.mark.parametrize(
    "loss_type,eps",
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.1),  # cDPO: ray_dpo's former sigmoid, now sigmoid_label_smoothing=True
        ("robust", 0.2),
        ("ipo", 0.0),
        ("hinge", 0.0),
        ("sppo_hard", 0.0),
        ("nca_pair", 0.0),
    ],
)
@pytest.mark.parametrize("reference_free", [False, True])
def test_losses_match_float64_reference(loss_type, eps, reference_free):
    gen = torch.Generator().manual_seed(len(loss_type) * 100 + round(eps * 10))
    pc, pr, rc, rr = (-30 * torch.rand(16, generator=gen, dtype=torch.float64) for _ in range(4))
    lc, lr = (torch.randint(1, 9, (16,), generator=gen) for _ in range(2))
    beta = 0.3
    options = dict(label_smoothing=eps, sigmoid_label_smoothing=loss_type == "sigmoid" and eps > 0)
    spec = LossSpec(loss_type=loss_type, beta=beta, reference_free=reference_free, **options)
    out = preference_loss(spec, PairLogps(pc, pr, lc, lr, rc, rr))
    loss, metrics = out.loss, out.metrics
    if reference_free:
        rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
    rows = zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), lc.tolist(), lr.tolist(), strict=True)
    expected = [reference_loss(c, r, c_ref, r_ref, beta, loss_type, eps, n, m) for c, r, c_ref, r_ref, n, m in rows]
    assert loss.dtype == torch.float64
    assert abs(loss.item() - sum(expected) / len(expected)) < 1e-9

    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    assert abs(metrics["rewards/chosen"].item() - chosen_rewards.mean().item()) < 1e-9
    assert abs(metrics["rewards/margins"].item() - (chosen_rewards - rejected_rewards).mean().item()) < 1e-9
    assert metrics["rewards/accuracies"].item() == (chosen_rewards > rejected_rewards).double().mean().item()
    assert metrics["logps/rejected"].item() == pytest.approx(pr.mean().item(), abs=1e-9)


def test_loss_option_errors():
    with pytest.raises(ValueError, match="loss_type must be one or more of"):
        DPO(tiny_lm(), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing=0.1 has no effect on"):
        DPO(tiny_lm(), loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="sigmoid_label_smoothing"):  # TRL's sigmoid ignores it: we refuse
        DPO(tiny_lm(), label_smoothing=0.1)
    with pytest.raises(TypeError, match="rpo_alpha"):  # the former option: loss_type=[sigmoid, sft] now
        DPO(tiny_lm(), rpo_alpha=0.5)
    chosen, rejected, prompt_mask = random_pairs()
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        DPO(tiny_lm(), reference="precomputed")(chosen, rejected, prompt_mask=prompt_mask)


class FixedLogits(nn.Module):
    """Returns a stored logits tensor, so every scored position can be checked by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, tokens):
        return self.logits[: tokens.shape[0], : tokens.shape[1]]


def test_token_alignment_scores_exactly_the_response():
    seq = torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0]])
    prompt_mask = torch.tensor([[True, True, True, False, False, False, False, False]])
    mask = response_mask(seq, prompt_mask, pad_id=0)
    assert seq[:, 1:][mask[:, 1:]].tolist() == [8, 9, 10]  # targets scored: not 7 (prompt), not the pad

    logits = torch.randn(2, 7, 12, dtype=torch.float64)
    log_probs = logits.log_softmax(-1)
    expected = sum(log_probs[0, t - 1, seq[0, t]].item() for t in (3, 4, 5))  # logits at t-1 score token t
    got = sequence_logps(FixedLogits(logits), seq, mask)
    assert got.item() == pytest.approx(expected, abs=1e-12)

    dpo = DPO(FixedLogits(logits), pad_id=0, reference="none")
    dpo(seq, seq, prompt_mask=prompt_mask)
    assert dpo.last_metrics["logps/chosen"].item() == pytest.approx(expected, abs=1e-12)


def test_masks_from_pad_id_and_explicit_masks_left_and_right_padding():
    right = torch.tensor([[5, 6, 7, 8, 0, 0]])
    left = torch.tensor([[0, 0, 5, 6, 7, 8]])
    right_prompt = torch.tensor([[1, 1, 0, 0, 0, 0]]).bool()
    left_prompt = torch.tensor([[0, 0, 1, 1, 0, 0]]).bool()
    assert response_mask(right, right_prompt, pad_id=0).tolist() == [[False, False, True, True, False, False]]
    assert response_mask(left, left_prompt, pad_id=0).tolist() == [[False, False, False, False, True, True]]
    explicit = torch.tensor([[1, 1, 1, 0, 0, 0]]).bool()  # seq mask wins over pad_id
    assert response_mask(right, right_prompt, explicit, pad_id=0).tolist() == [
        [False, False, True, False, False, False]
    ]
    lengths = response_mask_from_lengths(6, torch.tensor([2, 1]), torch.tensor([2, 4]))
    assert lengths.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]


def tiny_lm(seed=0, vocab=16):
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=vocab, max_seq_len=32, dim=32, depth=1, heads=2))


def random_pairs(batch=4, length=10, vocab=16, prompt_len=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randint(1, vocab, (batch, length), generator=gen)
    rejected = torch.randint(1, vocab, (batch, length), generator=gen)
    rejected[:, :prompt_len] = chosen[:, :prompt_len]
    prompt_mask = torch.zeros(batch, length, dtype=torch.bool)
    prompt_mask[:, :prompt_len] = True
    return chosen, rejected, prompt_mask


def test_policy_equal_to_reference_gives_log2_and_grads_reach_only_policy():
    dpo = DPO(tiny_lm(), beta=0.1, pad_id=0)
    chosen, rejected, prompt_mask = random_pairs()
    loss = dpo(chosen, rejected, prompt_mask=prompt_mask)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in dpo.policy_model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in dpo.ref_model.parameters())
    assert {id(p) for p in dpo.parameters()} == {id(p) for p in dpo.policy_model.parameters()}
    dpo.train()
    assert dpo.policy_model.training and not dpo.ref_model.training


def test_shape_errors_are_clear():
    dpo = DPO(tiny_lm(), pad_id=0)
    chosen, rejected, prompt_mask = random_pairs()
    with pytest.raises(ValueError, match=r"same \(batch, seq_len\) shape, got \(4, 10\) and \(4, 9\)"):
        dpo(chosen, rejected[:, :9], prompt_mask=prompt_mask)
    with pytest.raises(ValueError, match="same"):
        dpo(chosen[0], rejected[0], prompt_mask=prompt_mask[0])


def test_precomputed_reference_equals_live_reference_and_mean_reduction():
    chosen, rejected, prompt_mask = random_pairs()
    masks = response_mask(chosen, prompt_mask), response_mask(rejected, prompt_mask)
    for reduction in (None, "sum", "mean"):
        live = DPO(tiny_lm(), beta=0.5, pad_id=0, reduction=reduction)
        with torch.no_grad():  # make the policy differ from the reference
            for p in live.policy_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        live_loss = live(chosen, rejected, prompt_mask=prompt_mask)
        # precomputed log-probs are sums whatever the reduction: the loss divides by the token counts itself
        ref_c, ref_r = (
            sequence_logps(live.ref_model, seq, m) for seq, m in zip((chosen, rejected), masks, strict=True)
        )
        pre = DPO(live.policy_model, beta=0.5, pad_id=0, reduction=reduction, reference="precomputed")
        assert pre.ref_model is None
        pre_loss = pre(chosen, rejected, prompt_mask=prompt_mask, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        torch.testing.assert_close(pre_loss, live_loss)
        if reduction == "mean":  # ray_dpo's former option: the sigmoid loss on mean token log-probs
            pol_c, pol_r = (
                sequence_logps(live.policy_model, seq, m, "mean")
                for seq, m in zip((chosen, rejected), masks, strict=True)
            )
            ref_mc, ref_mr = (
                sequence_logps(live.ref_model, seq, m, "mean") for seq, m in zip((chosen, rejected), masks, strict=True)
            )
            h = (pol_c - ref_mc) - (pol_r - ref_mr)
            torch.testing.assert_close(live_loss, -torch.nn.functional.logsigmoid(0.5 * h).mean())
    summed = sequence_logps(live.policy_model, chosen, masks[0], "sum")
    averaged = sequence_logps(live.policy_model, chosen, masks[0], "mean")
    torch.testing.assert_close(averaged, summed / 6)


def test_sigmoid_plus_sft_adds_mean_chosen_nll():
    """RPO, formerly `rpo_alpha=0.5`: loss_type=[sigmoid, sft] weighted [1, 0.5] adds half the NLL per chosen token."""
    chosen, rejected, prompt_mask = random_pairs()
    chosen[0, -3:] = 0  # a shorter first response: the NLL is a mean over tokens, not over rows
    plain = DPO(tiny_lm(), pad_id=0)
    rpo = DPO(tiny_lm(), pad_id=0, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    mask = response_mask(chosen, prompt_mask, pad_id=0)[:, 1:]
    logps = token_logps(plain.policy_model(chosen[:, :-1]), chosen[:, 1:])
    nll = -logps[mask].mean()
    expected = plain(chosen, rejected, prompt_mask=prompt_mask) + 0.5 * nll
    torch.testing.assert_close(rpo(chosen, rejected, prompt_mask=prompt_mask), expected)


@pytest.mark.parametrize(
    "kwargs", [{"loss_type": "simpo"}, {"loss_type": ["orpo", "sft"]}, {"loss_type": "sft"}, {"reference": "none"}]
)
def test_reference_free_losses_hold_and_score_no_reference(kwargs):
    chosen, rejected, prompt_mask = random_pairs()
    dpo = DPO(tiny_lm(), pad_id=0, **kwargs)
    assert dpo.ref_model is None and dpo.reference == "none"
    loss = dpo(chosen, rejected, prompt_mask=prompt_mask)
    assert torch.isfinite(loss)
    if "loss_type" in kwargs:  # a model given for a loss that never reads it is a mistake worth naming
        with pytest.raises(ValueError, match="needs no reference"):
            DPO(tiny_lm(), ref_model=tiny_lm(), **kwargs)


def test_loss_type_lists_and_f_divergences_reach_the_loss():
    """The options go through to `preference_loss`: the DPO wrapper's loss is the module's on the same log-probs."""
    chosen, rejected, prompt_mask = random_pairs()
    options = dict(loss_type=["sigmoid", "ipo"], loss_weights=[0.7, 0.3], f_divergence_type="alpha_divergence")
    dpo = DPO(tiny_lm(), beta=0.2, pad_id=0, f_alpha_divergence_coef=0.3, **options)
    with torch.no_grad():
        for p in dpo.policy_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    masks = response_mask(chosen, prompt_mask), response_mask(rejected, prompt_mask)
    sums = [
        sequence_logps(m, seq, k)
        for m in (dpo.policy_model, dpo.ref_model)
        for seq, k in zip((chosen, rejected), masks, strict=True)
    ]
    counts = [k[:, 1:].sum(-1) for k in masks]
    spec = LossSpec(beta=0.2, f_alpha_divergence_coef=0.3, **options)
    expected = preference_loss(spec, PairLogps(sums[0], sums[1], *counts, sums[2], sums[3])).loss
    torch.testing.assert_close(dpo(chosen, rejected, prompt_mask=prompt_mask), expected)


def test_sync_reference_is_the_tr_dpo_mixture_in_float64():
    """TR-DPO (Gorbatovski et al. 2024): ref <- alpha * policy + (1 - alpha) * ref; alpha 1 copies the policy."""
    dpo = DPO(tiny_lm().double(), pad_id=0)
    with torch.no_grad():
        for p in dpo.policy_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    policy = {k: v.clone() for k, v in dpo.policy_model.state_dict().items()}
    before = {k: v.clone() for k, v in dpo.ref_model.state_dict().items()}
    dpo.sync_reference(0.3)
    after = dpo.ref_model.state_dict()
    assert any((after[k] != before[k]).any() for k in after)
    for k in after:
        torch.testing.assert_close(after[k], 0.3 * policy[k] + 0.7 * before[k], atol=1e-15, rtol=0)
    assert all(not p.requires_grad for p in dpo.ref_model.parameters()), "the reference stays frozen"
    dpo.sync_reference(1.0)
    for k, v in dpo.ref_model.state_dict().items():
        assert torch.equal(v, policy[k])
    with pytest.raises(ValueError, match=r"ref_model_mixup_alpha must be in \(0, 1\]"):
        dpo.sync_reference(0.0)
    shared = DPO(tiny_lm(), pad_id=0, ref_model=None)
    shared.ref_model = shared.policy_model  # a view of the policy's weights (LoRA with adapters off) cannot be synced
    with pytest.raises(ValueError, match="shares the policy's weights"):
        shared.sync_reference(0.5)


def test_dpo_training_increases_accuracy_and_margin():
    """A real optimisation: the policy learns to prefer chosen (prompt echoed) over rejected (noise)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 16, (16, 4), generator=gen)
    chosen = torch.cat((prompts, prompts.flip(1)), dim=1)
    rejected = torch.cat((prompts, torch.randint(1, 16, (16, 4), generator=gen)), dim=1)
    prompt_mask = torch.zeros_like(chosen, dtype=torch.bool)
    prompt_mask[:, :4] = True
    dpo = DPO(tiny_lm(), beta=0.1, pad_id=0)
    optimizer = torch.optim.AdamW(dpo.parameters(), lr=3e-3)
    _, before = dpo(chosen, rejected, prompt_mask=prompt_mask, return_metrics=True)
    for _ in range(200):
        loss = dpo(chosen, rejected, prompt_mask=prompt_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, after = dpo(chosen, rejected, prompt_mask=prompt_mask, return_metrics=True)
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == 0.0
    assert after["rewards/accuracies"] == 1.0
    assert after["rewards/margins"] > 2.0 and after["loss"] < 0.1


def test_works_with_x_transformers_and_hf_style_modules():
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    xt = TransformerWrapper(num_tokens=16, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2))
    chosen, rejected, prompt_mask = random_pairs()
    dpo = DPO(xt, beta=0.1, pad_id=0)
    loss = dpo(chosen, rejected, prompt_mask=prompt_mask)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert any(p.grad is not None for p in xt.parameters())

    class HFStyle(nn.Module):  # a Hugging Face causal LM returns an output object with `.logits`
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.inner(input_ids))

    lm = tiny_lm()
    mask = response_mask(chosen, prompt_mask)
    torch.testing.assert_close(sequence_logps(HFStyle(lm), chosen, mask), sequence_logps(lm, chosen, mask))
    hf_loss = DPO(HFStyle(lm), pad_id=0)(chosen, rejected, prompt_mask=prompt_mask)
    assert hf_loss.item() == pytest.approx(math.log(2), abs=1e-6)
