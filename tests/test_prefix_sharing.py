"""Prefix sharing: one packed [prompt, chosen, rejected] row per pair must score exactly like two sequences."""

import copy

import pytest
import torch
from torch import nn

from ray_dpo.core.attention import attend
from ray_dpo.core.dpo import DPO, sequence_logps, token_logps
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.pairs import (
    lengths_from_masks,
    pack_pairs,
    packed_token_logps,
    response_mask_from_lengths,
    score_batch,
)

PAD = 0
TOL = dict(atol=1e-5, rtol=1e-5)


def prefix_shared_logps(model, chosen, rejected, p, c, r, reduction="sum", pad_id=PAD):
    """Sequence log-probs of both responses from ONE packed forward (the training batch's prefix-sharing path)."""
    batch = dict(chosen=chosen, rejected=rejected, prompt_len=p, chosen_len=c, rejected_len=r)
    return score_batch(model, batch, prefix_sharing=True, pad_id=pad_id).sequence(reduction)


def tiny_model(seed: int, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    config = dict(vocab_size=37, max_seq_len=64, dim=32, depth=2, heads=4) | overrides
    model = TransformerLM(ModelConfig(**config)).eval()
    for param in model.parameters():  # larger than the GPT-2 init, so tokens interact and errors would show
        param.data.normal_(0, 0.3)
    return model


def random_pairs(seed: int, batch: int = 6, n: int = 24, vocab: int = 37):
    """Right-padded pairs sharing a prompt; lengths include the edge cases (empty responses, 1-token prompt)."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, n // 2, (batch,), generator=g)
    chosen_len = torch.stack([torch.randint(0, n - int(p) + 1, (1,), generator=g)[0] for p in prompt_len])
    rejected_len = torch.stack([torch.randint(0, n - int(p) + 1, (1,), generator=g)[0] for p in prompt_len])
    prompt_len[0], chosen_len[1], rejected_len[2] = 1, 0, 0
    chosen_len[3], rejected_len[3] = n - prompt_len[3], n - prompt_len[3]  # a row that fills the whole width
    chosen = torch.randint(1, vocab, (batch, n), generator=g)
    rejected = torch.randint(1, vocab, (batch, n), generator=g)
    j = torch.arange(n)
    rejected = torch.where(j < prompt_len[:, None], chosen, rejected)
    chosen = chosen.masked_fill(j >= (prompt_len + chosen_len)[:, None], PAD)
    rejected = rejected.masked_fill(j >= (prompt_len + rejected_len)[:, None], PAD)
    return chosen, rejected, prompt_len, chosen_len, rejected_len


def concatenated_token_logps(model, seq):
    """Target-indexed log-probs of the plain two-sequence path: entry t scores token t (entry 0 unused)."""
    with torch.no_grad():
        return torch.nn.functional.pad(token_logps(model(seq[:, :-1]), seq[:, 1:]), (1, 0))


def test_pack_layout_on_hand_made_pairs():
    # row 0: prompt 5 6, chosen 7 8, rejected 9; row 1: prompt 4, chosen 3, rejected 2 1
    chosen = torch.tensor([[5, 6, 7, 8, 0, 0], [4, 3, 0, 0, 0, 0]])
    rejected = torch.tensor([[5, 6, 9, 0, 0, 0], [4, 2, 1, 0, 0, 0]])
    lengths = torch.tensor([2, 1]), torch.tensor([2, 1]), torch.tensor([1, 2])
    packed = pack_pairs(chosen, rejected, *lengths, pad_id=0)
    # each row's longer response first (row 1: rejected); the second starts at split = max(p + longer) = 4
    assert packed.tokens.tolist() == [[5, 6, 7, 8, 9], [4, 2, 1, 0, 3]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 1]]  # responses restart after the prompt
    assert packed.chosen_mask.int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert packed.rejected_mask.int().tolist() == [[0, 0, 0, 0, 1], [0, 1, 1, 0, 0]]
    assert packed.last_prompt.tolist() == [1, 0]
    mask = packed.attn_mask
    assert (mask.split, mask.prompt_keys) == (4, 2)
    # second-block queries over keys [prompt column 0, prompt column 1, second block 0]
    assert mask.second_mask.shape == (2, 1, 1, 3)
    assert mask.second_mask[:, 0, 0].int().tolist() == [[1, 1, 1], [1, 0, 1]]  # row 1's prompt is 1 token


@pytest.mark.parametrize(
    ("dtype", "n", "compiled"),
    [(torch.float64, 20, False), (torch.bfloat16, 20, False), (torch.bfloat16, 300, False)]
    + [(torch.bfloat16, 300, True)],
)
@pytest.mark.usefixtures("fresh_compiler")
def test_shared_prefix_attention_equals_full_mask_attention(dtype, n, compiled):
    """The packed attention equals plain attention under the equivalent full (L, L) mask, values and gradients: in
    float64 (two SDPA blocks) and in bf16 on CPU (`tiled_attention`, the mask as a bias built once per batch; at
    n = 300 both blocks are split into tiles that skip masked keys; compiled, two matmul blocks, the second with the
    bias the mask was built with)."""
    chosen, rejected, p, c, r = random_pairs(3, batch=5, n=n)
    packed = pack_pairs(chosen, rejected, p, c, r, pad_id=PAD)
    batch, width = packed.tokens.shape
    split = packed.attn_mask.split
    # full mask: causal in the first block; second-block queries see their row's prompt keys and causal second keys
    full = torch.zeros(batch, 1, width, width, dtype=torch.bool)
    full[:, :, :split, :split] = torch.ones(split, split, dtype=torch.bool).tril()
    prompt_keys = packed.attn_mask.prompt_keys
    full[:, :, split:, :prompt_keys] = packed.attn_mask.second_mask[..., :prompt_keys]
    full[:, :, split:, split:] = packed.attn_mask.second_mask[..., prompt_keys:]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 2, width, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    grad = torch.randn(batch, 2, width, 8, generator=g, dtype=torch.float64)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    got = (torch.compile(attend, fullgraph=True) if compiled else attend)(*leaves, packed.attn_mask, False, 0.0)
    got.backward(grad.to(dtype))
    want_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*want_leaves, attn_mask=full)
    want.backward(grad)
    tol = dict(atol=0.05, rtol=0.05) if dtype == torch.bfloat16 else {}
    for ours, reference in zip([got] + [x.grad for x in leaves], [want] + [x.grad for x in want_leaves], strict=True):
        torch.testing.assert_close(ours.double(), reference.detach(), **tol)
    assert bool(packed.attn_mask._biases) == (dtype == torch.bfloat16 and not compiled)  # eager bf16: tiles' bias
    if n == 300 and not compiled:
        assert type(got.grad_fn).__name__ == "_TiledAttentionBackward"
        assert len(packed.attn_mask.tiles(2)) == 5  # causal 75 / 75 / 150 rows, second block in halves


@pytest.mark.parametrize("seed", range(4))
def test_per_token_logps_equal_concatenated_path(seed):
    model = tiny_model(seed)
    chosen, rejected, p, c, r = random_pairs(seed)
    packed = pack_pairs(chosen, rejected, p, c, r, pad_id=PAD)
    with torch.no_grad():
        packed_lp = packed_token_logps(model, packed)
    assert torch.isfinite(packed_lp).all()  # pad rows and pad queries must not produce NaN
    ref_chosen, ref_rejected = concatenated_token_logps(model, chosen), concatenated_token_logps(model, rejected)
    n = chosen.shape[1]
    chosen_scored = response_mask_from_lengths(n, p, c) & (torch.arange(n) >= 1)
    rejected_scored = response_mask_from_lengths(n, p, r) & (torch.arange(n) >= 1)
    assert packed.chosen_mask.sum() == chosen_scored.sum() and packed.rejected_mask.sum() == rejected_scored.sum()
    for b in range(chosen.shape[0]):
        torch.testing.assert_close(packed_lp[b][packed.chosen_mask[b]], ref_chosen[b][chosen_scored[b]], **TOL)
        torch.testing.assert_close(packed_lp[b][packed.rejected_mask[b]], ref_rejected[b][rejected_scored[b]], **TOL)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_equal_concatenated_path(reduction):
    model = tiny_model(7, depth=3, heads=2)
    chosen, rejected, p, c, r = random_pairs(7, batch=8, n=32)
    with torch.no_grad():
        got_c, got_r = prefix_shared_logps(model, chosen, rejected, p, c, r, reduction=reduction, pad_id=PAD)
        want_c = sequence_logps(model, chosen, response_mask_from_lengths(32, p, c), reduction)
        want_r = sequence_logps(model, rejected, response_mask_from_lengths(32, p, r), reduction)
    torch.testing.assert_close(got_c, want_c, **TOL)
    torch.testing.assert_close(got_r, want_r, **TOL)


def _batch(seed):
    chosen, rejected, p, c, r = random_pairs(seed)
    return dict(chosen=chosen, rejected=rejected, prompt_len=p, chosen_len=c, rejected_len=r)


@pytest.mark.parametrize(
    "kwargs", [{}, {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5]}, {"reference": "none"}]
)
def test_dpo_batch_loss_metrics_and_grads_match(kwargs):
    batch = _batch(11)
    policy = tiny_model(11)
    reference = tiny_model(12)  # a reference that differs from the policy, so the ref terms matter
    losses, grads = [], []
    for prefix_sharing in (False, True):
        dpo = DPO(copy.deepcopy(policy), pad_id=PAD, prefix_sharing=prefix_sharing, **kwargs)
        if dpo.ref_model is not None:
            dpo.ref_model.load_state_dict(reference.state_dict())
        loss, metrics = dpo.batch_loss(batch)
        loss.backward()
        losses.append((loss.detach(), metrics))
        grads.append([param.grad.clone() for param in dpo.parameters()])
    torch.testing.assert_close(losses[0][0], losses[1][0], **TOL)
    for key, value in losses[0][1].items():
        torch.testing.assert_close(losses[1][1][key], value, **TOL, msg=key)
    for plain, shared in zip(*grads, strict=True):
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)


def test_precomputed_reference_from_batch_is_used():
    batch = _batch(3) | {"ref_chosen_logp": torch.randn(6), "ref_rejected_logp": torch.randn(6)}
    model = tiny_model(3)
    plain = DPO(model, pad_id=PAD, reference="precomputed").batch_loss(batch)
    shared = DPO(model, pad_id=PAD, reference="precomputed", prefix_sharing=True).batch_loss(batch)
    torch.testing.assert_close(shared[0], plain[0], **TOL)
    torch.testing.assert_close(shared[1]["rewards/margins"], plain[1]["rewards/margins"], **TOL)


def test_seed_contract_forward_uses_packing_and_matches():
    """`dpo(preferred, unpreferred, prompt_mask=...)` goes through masks; lengths are recovered from them."""
    chosen, rejected, p, c, r = random_pairs(5)
    prompt_mask = torch.arange(chosen.shape[1]) < p[:, None]
    model = tiny_model(5)
    plain = DPO(model, pad_id=PAD)(chosen, rejected, prompt_mask=prompt_mask)
    shared = DPO(model, pad_id=PAD, prefix_sharing=True)(chosen, rejected, prompt_mask=prompt_mask)
    torch.testing.assert_close(shared, plain, **TOL)


def test_lengths_from_masks_round_trip_and_rejects_other_layouts():
    chosen, rejected, p, c, r = random_pairs(9)
    n = chosen.shape[1]
    got = lengths_from_masks(chosen, rejected, response_mask_from_lengths(n, p, c), response_mask_from_lengths(n, p, r))
    both_empty = (c == 0) & (r == 0)
    assert torch.equal(torch.where(both_empty, 0, got[0]), torch.where(both_empty, 0, p))
    assert torch.equal(got[1], c) and torch.equal(got[2], r)
    holey = response_mask_from_lengths(n, p, c)
    holey[3, int(p[3]) + 1] = False  # a response with a masked-out middle token cannot be packed
    with pytest.raises(ValueError, match="contiguous"):
        lengths_from_masks(chosen, rejected, holey, response_mask_from_lengths(n, p, r))
    other_prompt = rejected.clone()
    other_prompt[0, 0] += 1  # prompts that differ cannot share one prefix
    with pytest.raises(ValueError, match="share"):
        lengths_from_masks(
            chosen, other_prompt, response_mask_from_lengths(n, p, c), response_mask_from_lengths(n, p, r)
        )


def test_other_models_raise_a_clear_error_and_wrappers_pass():
    plain_module = nn.Sequential(nn.Embedding(37, 8), nn.Linear(8, 37))
    with pytest.raises(TypeError, match="TransformerLM"):
        DPO(plain_module, prefix_sharing=True)
    wrapper = nn.Module()
    wrapper.module = tiny_model(0)  # the shape of DDP / FSDP wrappers
    DPO(wrapper, prefix_sharing=True)


def test_too_long_lengths_raise():
    chosen, rejected, p, c, r = random_pairs(1)
    with pytest.raises(ValueError, match="sequence length"):
        pack_pairs(chosen, rejected, p, c + chosen.shape[1], r)


def test_bf16_autocast_runs_and_stays_close():
    model = tiny_model(2)
    chosen, rejected, p, c, r = random_pairs(2)
    with torch.no_grad():
        want = prefix_shared_logps(model, chosen, rejected, p, c, r, pad_id=PAD)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = prefix_shared_logps(model, chosen, rejected, p, c, r, pad_id=PAD)
    assert got[0].dtype == torch.float32  # log-softmax is taken in fp32 even under autocast
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.5, rtol=0.05)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("fresh_compiler")
def test_compiled_policy_and_reference_match_eager():
    """`train.compile`: torch.compile of the policy and the live reference gives the eager loss and gradients, also
    once it recompiles with dynamic shapes for new row widths and splits (the third batch runs the dynamic graph)."""
    policy, reference = tiny_model(13, depth=1), tiny_model(14, depth=1)
    eager, compiled = (
        DPO(copy.deepcopy(policy), pad_id=PAD, prefix_sharing=True, ref_model=copy.deepcopy(reference))
        for _ in range(2)
    )
    compiled.policy_model, compiled.ref_model = torch.compile(compiled.policy_model), torch.compile(compiled.ref_model)
    for seed, n in ((13, 16), (14, 24), (15, 32), (16, 20)):  # a new (width, split) each time
        chosen, rejected, p, c, r = random_pairs(seed, n=n)
        batch = dict(chosen=chosen, rejected=rejected, prompt_len=p, chosen_len=c, rejected_len=r)
        results = []
        for dpo in (eager, compiled):
            dpo.zero_grad(set_to_none=True)
            loss, _ = dpo.batch_loss(batch)
            loss.backward()
            results.append([loss.detach()] + [param.grad for param in dpo.parameters()])
        for want, got in zip(*results, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_hidden_from_equals_the_rows_of_the_full_forward(packed, bf16):
    """`hidden_from`: the last block runs no query before that row; the rows it returns and every gradient equal the
    full forward's: fp32 to 1e-5, and bf16 on CPU (attention tiles cut at that row) to bf16 precision."""
    model = tiny_model(0, max_seq_len=320).train()
    chosen, rejected, p, c, r = (x[1:] for x in random_pairs(5, batch=5, n=300))  # row 0's prompt is 1 token
    if packed:
        pairs = pack_pairs(chosen, rejected, p, c, r, pad_id=PAD)
        kwargs = dict(positions=pairs.positions, attn_mask=pairs.attn_mask)
        tokens, start = pairs.tokens, int(pairs.last_prompt.min())
    else:
        tokens, start, kwargs = chosen, int(p.min()) - 1 + 40, {}  # 40 rows into the 75..150 causal tile
    assert start > 0
    grad = torch.randn(tokens.shape[0], tokens.shape[1] - start, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for hidden_from in (0, start):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model(tokens, return_hidden=True, hidden_from=hidden_from, **kwargs)[:, start - hidden_from :]
        hidden.float().backward(grad)
        results.append([hidden.float()] + [param.grad for param in model.parameters()])
    tol = dict(atol=0.05, rtol=0.05) if bf16 else TOL
    for full, skipped in zip(*results, strict=True):
        torch.testing.assert_close(skipped, full, **tol)
