import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ray_dpo.core.dpo import DPO, sequence_logps, token_logps
from ray_dpo.core.losses import dpo_loss
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.pairs import response_mask, response_mask_from_lengths


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_loss(pc, pr, rc, rr, beta, loss_type, eps):
    """Per-pair loss written out from the papers, on Python floats (float64)."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
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
        ("sigmoid", 0.1),
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
    beta = 0.3
    loss, metrics = dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, reference_free=reference_free
    )
    if reference_free:
        rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
    rows = zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)
    expected = [reference_loss(*row, beta, loss_type, eps) for row in rows]
    assert loss.dtype == torch.float64
    assert abs(loss.item() - sum(expected) / len(expected)) < 1e-6

    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    assert abs(metrics["rewards/chosen"].item() - chosen_rewards.mean().item()) < 1e-9
    assert abs(metrics["rewards/margins"].item() - (chosen_rewards - rejected_rewards).mean().item()) < 1e-9
    assert metrics["rewards/accuracies"].item() == (chosen_rewards > rejected_rewards).double().mean().item()
    assert metrics["logps/rejected"].item() == pytest.approx(pr.mean().item(), abs=1e-9)


def test_loss_option_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing applies to 'sigmoid' and 'robust'"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="reference log-probs"):
        dpo_loss(x, x, None, None)


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
    for reduction in ("sum", "mean"):
        live = DPO(tiny_lm(), beta=0.5, pad_id=0, reduction=reduction)
        with torch.no_grad():  # make the policy differ from the reference
            for p in live.policy_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        live_loss = live(chosen, rejected, prompt_mask=prompt_mask)
        ref_c = sequence_logps(live.ref_model, chosen, response_mask(chosen, prompt_mask), reduction)
        ref_r = sequence_logps(live.ref_model, rejected, response_mask(rejected, prompt_mask), reduction)
        pre = DPO(live.policy_model, beta=0.5, pad_id=0, reduction=reduction, reference="precomputed")
        assert pre.ref_model is None
        pre_loss = pre(chosen, rejected, prompt_mask=prompt_mask, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        torch.testing.assert_close(pre_loss, live_loss)
    summed = sequence_logps(live.policy_model, chosen, response_mask(chosen, prompt_mask), "sum")
    averaged = sequence_logps(live.policy_model, chosen, response_mask(chosen, prompt_mask), "mean")
    torch.testing.assert_close(averaged, summed / 6)


def test_rpo_adds_mean_chosen_nll():
    chosen, rejected, prompt_mask = random_pairs()
    plain = DPO(tiny_lm(), pad_id=0)
    rpo = DPO(tiny_lm(), pad_id=0, rpo_alpha=0.5)
    mask = response_mask(chosen, prompt_mask)[:, 1:]
    logps = token_logps(plain.policy_model(chosen[:, :-1]), chosen[:, 1:])
    nll = -logps[mask].mean()
    expected = plain(chosen, rejected, prompt_mask=prompt_mask) + 0.5 * nll
    torch.testing.assert_close(rpo(chosen, rejected, prompt_mask=prompt_mask), expected)


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
