"""`logps.scored_logps` / `target_logps`: the full-logits path's values and gradients, without (B, N, V) logits."""

import math

import pytest
import torch
from torch import nn

from ray_dpo.core.dpo import token_logps
from ray_dpo.core.logps import scored_logps, scoring_path, target_logps
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.pairs import pack_pairs, packed_token_logps

VOCAB = 97


def tiny_lm(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=VOCAB, max_seq_len=64, dim=32, depth=2, heads=2))


def tiny_hf(kind: str, seed: int = 0, **extra) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
    }[kind]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    return model_cls(config)


def batch(rows: int = 3, length: int = 21, seed: int = 1, density: float = 0.6):
    """Tokens (rows, length) and a ragged scored-target mask (rows, length - 1) with an all-False row."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (rows, length), generator=gen)
    mask = torch.rand(rows, length - 1, generator=gen) < density
    mask[-1] = False  # a row with nothing scored
    return seq, mask


def plain_logps(model: nn.Module, seq: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """The full-logits path the chunked one must reproduce."""
    output = model(seq[:, :-1], **kwargs)
    return token_logps(getattr(output, "logits", output), seq[:, 1:]).masked_fill(~mask, 0.0)


def values_and_grads(model: nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B, T) log-probs from `fn()` and every parameter's gradient of a weighted sum of them (generic weights, so a
    wrong gradient anywhere in the row shows)."""
    model.zero_grad(set_to_none=True)
    logps = fn()
    weights = torch.linspace(-1.0, 2.0, logps.numel()).reshape(logps.shape)
    (logps * weights).sum().backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values())  # every trainable parameter is reached
    return logps.detach(), {name: p.grad.clone() for name, p in trainable.items()}


def assert_same(got, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    (got_lp, got_grads), (exp_lp, exp_grads) = got, expected
    assert got_lp.dtype == torch.float32
    torch.testing.assert_close(got_lp, exp_lp, atol=atol, rtol=rtol)
    assert got_grads.keys() == exp_grads.keys()
    for name, grad in exp_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# --- the chunked head on its own -------------------------------------------------------------------------------------


def test_target_logps_float64_by_hand():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    got = target_logps(hidden, weight, targets, bias=bias, chunk_size=2)
    assert got.dtype == torch.float64
    h, w, b = hidden.tolist(), weight.tolist(), bias.tolist()
    for i, t in enumerate(targets.tolist()):
        logits = [sum(h[i][d] * w[v][d] for d in range(3)) + b[v] for v in range(7)]
        expected = logits[t] - math.log(sum(math.exp(z) for z in logits))
        assert got[i].item() == pytest.approx(expected, abs=1e-12)
    # d logp_i / d hidden_i = W[t_i] - sum_v softmax_v W[v], written out
    got.sum().backward()
    for i, t in enumerate(targets.tolist()):
        logits = [sum(h[i][d] * w[v][d] for d in range(3)) + b[v] for v in range(7)]
        norm = sum(math.exp(z) for z in logits)
        for d in range(3):
            expected = w[t][d] - sum(math.exp(logits[v]) / norm * w[v][d] for v in range(7))
            assert hidden.grad[i, d].item() == pytest.approx(expected, abs=1e-12)
    check = lambda h, w, b: target_logps(h, w, targets, bias=b, chunk_size=2)
    assert torch.autograd.gradcheck(check, (hidden.detach().requires_grad_(), weight, bias))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_target_logps_matches_log_softmax_in_fp32(chunk_size):
    gen = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (11,), generator=gen)
    got = target_logps(hidden, weight, targets, chunk_size=chunk_size)
    got.sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    expected.sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grads, (hidden.grad, weight.grad), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        target_logps(hidden, weight, targets, chunk_size=0)


# --- whole models: equal to the full-logits path, gradients of every parameter included ------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])  # 7 does not divide the ~35 scored rows; 4096 is one chunk
def test_transformer_lm_tied_matches_full_logits(chunk_size):
    model = tiny_lm()
    assert model.to_logits.weight is model.token_emb.weight
    assert scoring_path(model) == "transformer_lm"
    seq, mask = batch()
    chunked = values_and_grads(model, lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask, chunk_size=chunk_size))
    assert_same(chunked, values_and_grads(model, lambda: plain_logps(model, seq, mask)))
    assert chunked[0][~mask].eq(0).all() and chunked[0][-1].eq(0).all()
    with torch.no_grad():  # the reference model's call: nothing saved for backward, same values
        no_grad = scored_logps(model, seq[:, :-1], seq[:, 1:], mask, chunk_size=chunk_size)
    torch.testing.assert_close(no_grad, chunked[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True)])
def test_hf_causal_lm_matches_full_logits(kind, tied):
    model = tiny_hf(kind, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert scoring_path(model) == "hf"
    seq, mask = batch()
    chunked = values_and_grads(model, lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask, chunk_size=5))
    assert_same(chunked, values_and_grads(model, lambda: plain_logps(model, seq, mask)))


def test_hf_passes_attention_mask_and_position_ids():
    """Left-padded rows: the padding mask and the shifted positions reach the decoder body."""
    model = tiny_hf("llama")
    seq, mask = batch(density=1.0)
    pad = torch.zeros_like(seq, dtype=torch.bool)
    pad[0, :5], pad[1, :2] = True, True
    attention = (~pad[:, :-1]).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    mask = mask & ~pad[:, 1:]
    kwargs = dict(attention_mask=attention, position_ids=positions)
    chunked = values_and_grads(
        model,
        lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask, positions=positions, attn_mask=attention),
    )
    assert_same(chunked, values_and_grads(model, lambda: plain_logps(model, seq, mask, **kwargs)))
    without = scored_logps(model, seq[:, :-1], seq[:, 1:], mask)  # the mask matters: it really was passed
    assert not torch.allclose(without[0], chunked[0][0], atol=1e-3)


def test_prefix_sharing_packed_rows_match_packed_token_logps():
    """The integration recipe for `dpo.packed_token_logps`: targets are the packed tokens themselves, each scored by
    the output before it, except the second response's first token, scored at the last prompt token."""
    model = tiny_lm()
    gen = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randint(1, VOCAB, (2, 3, 16), generator=gen)
    prompt_len, chosen_len, rejected_len = torch.tensor([4, 6, 1]), torch.tensor([7, 3, 10]), torch.tensor([5, 9, 2])
    rejected[:, :6] = chosen[:, :6]  # shared prompts
    packed = pack_pairs(chosen, rejected, prompt_len, chosen_len, rejected_len)
    scored = packed.chosen_mask | packed.rejected_mask
    source = torch.arange(-1, packed.tokens.shape[1] - 1).expand_as(packed.tokens).clone()
    source[:, packed.attn_mask.split] = packed.last_prompt

    def chunked():
        return scored_logps(
            model,
            packed.tokens,
            packed.tokens,
            scored,
            source=source,
            positions=packed.positions,
            attn_mask=packed.attn_mask,
            chunk_size=4,
        )

    plain = lambda: packed_token_logps(model, packed).masked_fill(~scored, 0.0)
    assert_same(values_and_grads(model, chunked), values_and_grads(model, plain))


def test_lora_wrapped_hf_model_matches_full_logits():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(tiny_hf("llama"), config)
    assert scoring_path(model) == "hf"
    seq, mask = batch()
    chunked = values_and_grads(model, lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask, chunk_size=6))
    assert_same(chunked, values_and_grads(model, lambda: plain_logps(model, seq, mask)))
    assert any("lora" in name for name in chunked[1])

    head_lora = peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    with pytest.raises(ValueError, match="plain nn.Linear lm_head"):  # the LoRA delta would be skipped
        scoring_path(peft.get_peft_model(tiny_hf("llama"), head_lora))


@pytest.mark.parametrize("model_fn", [tiny_lm, lambda: tiny_hf("llama")], ids=["transformer_lm", "llama"])
def test_empty_mask_gives_zeros_and_zero_gradients(model_fn):
    model = model_fn()
    seq, mask = batch()
    mask[:] = False
    logps, grads = values_and_grads(model, lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask))
    assert logps.shape == mask.shape and logps.eq(0).all()
    assert all(g.eq(0).all() for g in grads.values())


def test_other_modules_fall_back_to_full_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))
    assert scoring_path(model) == "full_logits"
    seq, mask = batch()
    got = values_and_grads(model, lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask, chunk_size=3))
    assert_same(got, values_and_grads(model, lambda: plain_logps(model, seq, mask)))


# --- bf16 autocast with fp32 master weights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_fn", [tiny_lm, lambda: tiny_hf("qwen2", tie_word_embeddings=True)], ids=["ours", "qwen2"]
)
def test_bf16_autocast_matches_within_bf16_tolerance(model_fn):
    model = model_fn()
    seq, mask = batch()

    def under_autocast(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()

        return values_and_grads(model, run)

    chunked = under_autocast(lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask, chunk_size=5))
    plain = under_autocast(lambda: plain_logps(model, seq, mask))
    fp32 = values_and_grads(model, lambda: scored_logps(model, seq[:, :-1], seq[:, 1:], mask))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert chunked[0].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in chunked[1].values())  # gradients of the fp32 master weights
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per rounding). Both paths round the same matmuls; the head's
    # weight gradient differs most (summed over chunks in fp32 here, rounded to bf16 once in the plain path).
    assert_close_to_scale(chunked, plain, 1e-2)
    assert_close_to_scale(chunked, fp32, 3e-2)  # and it is still the fp32 answer, to bf16 precision


def assert_close_to_scale(got, expected, tol: float) -> None:
    """Max error of the log-probs and of each gradient within `tol` x that tensor's largest magnitude."""
    (got_lp, got_grads), (exp_lp, exp_grads) = got, expected
    assert (got_lp - exp_lp).abs().max() <= tol * exp_lp.abs().max()
    assert got_grads.keys() == exp_grads.keys()
    for name, grad in exp_grads.items():
        error = (got_grads[name] - grad).abs().max() / grad.abs().max()
        assert error <= tol, f"{name}: relative error {error:.2e}"


# --- refusals ---------------------------------------------------------------------------------------------------------


def test_refuses_hf_models_whose_logits_the_plain_head_would_not_reproduce():
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        scoring_path(tiny_hf("gemma2", head_dim=16))
    with pytest.raises(ValueError, match="logit_scale=0.0625"):
        scoring_path(tiny_hf("cohere", logit_scale=0.0625))
    assert scoring_path(tiny_hf("cohere", logit_scale=1.0)) == "hf"

    class Wrapper(nn.Module):  # DDP-like: `.module`; calling the body directly would skip its forward
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    with pytest.raises(ValueError, match="gradient sync"):
        scoring_path(Wrapper(tiny_hf("llama")))
    assert scoring_path(Wrapper(tiny_lm())) == "transformer_lm"  # called through the wrapper, return_hidden=True
