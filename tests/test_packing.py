"""Packing (`data.packing`): whole pairs side by side in rows of up to `pack_len` tokens must score exactly like the
unpacked pairs: per-token log-probs, the DPO loss and every gradient, against the plain concatenated path in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_prefix_sharing import PAD, random_pairs, tiny_model

from ray_dpo.core.attention import PAIR_GROUP_MAX, PairBlocks, attend
from ray_dpo.core.dpo import DPO
from ray_dpo.core.pairs import layout_tokens, pack_rows, plan_rows, score_batch

EXACT = dict(atol=1e-12, rtol=1e-10)  # float64: another summation order, nothing else


def _batch(seed: int, batch: int = 6, n: int = 24) -> dict:
    chosen, rejected, p, c, r = random_pairs(seed, batch=batch, n=n)
    return dict(chosen=chosen, rejected=rejected, prompt_len=p, chosen_len=c, rejected_len=r)


def _lengths(batch: dict) -> tuple:
    return tuple(batch[k] for k in ("chosen", "rejected", "prompt_len", "chosen_len", "rejected_len"))


def test_pack_layout_on_hand_made_pairs():
    # pair 0: prompt 5 6, chosen 7 8, rejected 9; pair 1: prompt 4, chosen 3, rejected 2 1
    chosen = torch.tensor([[5, 6, 7, 8, 0], [4, 3, 0, 0, 0]])
    rejected = torch.tensor([[5, 6, 9, 0, 0], [4, 2, 1, 0, 0]])
    lengths = torch.tensor([2, 1]), torch.tensor([2, 1]), torch.tensor([1, 2])
    shared = pack_rows(chosen, rejected, *lengths, prefix_sharing=True, pack_len=9)
    # one row: [prompt, chosen, rejected] per pair, the larger pair first; positions restart at every pair, and the
    # rejected response restarts at the prompt's end
    assert shared.tokens.tolist() == [[5, 6, 7, 8, 9, 4, 3, 2, 1]]
    assert shared.positions.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert shared.attn_mask.blocks == ((0, 0, 2, 4, 5), (0, 5, 6, 7, 9))
    assert shared.scored.int().tolist() == [[0, 0, 1, 1, 1, 0, 1, 1, 1]]
    assert shared.source.tolist()[0][4] == 1 and shared.source.tolist()[0][7] == 5  # rejected: the prompt's last
    flat = shared.tokens.flatten()
    assert flat[shared.chosen_index][shared.chosen_mask].tolist() == [7, 8, 3]
    assert flat[shared.rejected_index][shared.rejected_mask].tolist() == [9, 2, 1]
    # without prefix sharing: two sequences per pair; at pack_len 8 each pair gets its own row, padded after it
    plain = pack_rows(chosen, rejected, *lengths, prefix_sharing=False, pack_len=8)
    assert plain.tokens.tolist() == [[5, 6, 7, 8, 5, 6, 9], [4, 3, 4, 2, 1, 0, 0]]
    assert plain.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 0, 0]]
    assert plain.attn_mask.block_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, -1, -1]]
    assert plain.pair_tokens == 12 and plain.tokens.numel() == 14
    assert layout_tokens(dict(zip(("prompt_len", "chosen_len", "rejected_len"), lengths, strict=True)),
                         prefix_sharing=False, pack_len=8) == (14, 12)  # fmt: skip


def test_the_padded_fraction_counts_the_positions_each_layout_runs():
    """`layout_tokens` (train/padded_fraction) against the tensors each layout builds from the same batch."""
    from ray_dpo.core.pairs import pack_pairs, pair_sizes

    batch = _batch(13, batch=8, n=30)
    chosen, rejected, p, c, r = _lengths(batch)
    width = int((p + torch.maximum(c, r)).max())  # the collate pads to the batch's longest pair
    batch = {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}
    real = {ps: int(pair_sizes(p.numpy(), c.numpy(), r.numpy(), ps).sum()) for ps in (False, True)}
    assert layout_tokens(batch, prefix_sharing=False, pack_len=None) == (2 * 8 * width, real[False])
    shared = pack_pairs(batch["chosen"], batch["rejected"], p, c, r)
    assert layout_tokens(batch, prefix_sharing=True, pack_len=None) == (shared.tokens.numel(), real[True])
    for ps in (False, True):
        packed = pack_rows(*_lengths(batch), prefix_sharing=ps, pack_len=64)
        assert layout_tokens(batch, prefix_sharing=ps, pack_len=64) == (packed.tokens.numel(), real[ps])
        assert packed.pair_tokens == real[ps] == int((packed.attn_mask.block_ids >= 0).sum())


def test_rows_are_filled_evenly_and_never_past_pack_len():
    sizes = torch.tensor([9, 7, 6, 5, 4, 3, 3, 1]).numpy()
    row, offset, rows, width = plan_rows(sizes, pack_len=14)
    fill = [int(sizes[row == k].sum()) for k in range(rows)]
    assert rows == 3 and width == max(fill) <= 14 and sum(fill) == 38  # as few rows as 38 tokens need
    assert min(fill) >= 12  # filled evenly (largest first into the emptiest row): no nearly empty last row
    for k in range(rows):  # pairs of a row sit one after another from column 0
        spans = sorted((int(offset[i]), int(sizes[i])) for i in range(len(sizes)) if row[i] == k)
        assert [o for o, _ in spans] == [sum(s for _, s in spans[:j]) for j in range(len(spans))]
    with pytest.raises(ValueError, match="pack_len"):
        plan_rows(sizes, pack_len=8)


@pytest.mark.parametrize("prefix_sharing", [False, True])
@pytest.mark.parametrize("pack_len", [48, 1000])  # several rows, and every pair in one row
def test_packed_dpo_loss_metrics_and_grads_equal_the_concatenated_path(prefix_sharing, pack_len):
    """float64, our model: the packed loss, its metrics and every gradient equal two plain sequences per pair (rows
    of pairs up to 44 tokens and pack_len 48: most pairs alone in a row; 1000: all six pairs in one row)."""
    torch.set_default_dtype(torch.float64)
    try:
        policy, reference = tiny_model(21, max_seq_len=64), tiny_model(22, max_seq_len=64)
    finally:
        torch.set_default_dtype(torch.float32)
    batch = _batch(21)
    results = []
    for packed in (False, True):
        dpo = DPO(
            copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            pad_id=PAD,
            prefix_sharing=prefix_sharing and packed,
            pack_len=pack_len if packed else None,
            loss_type=["sigmoid", "sft"],  # sft: the chosen NLL term reads the per-token log-probs too
            loss_weights=[1.0, 0.5],
        )
        loss, metrics = dpo.batch_loss(batch)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad for p in dpo.parameters()]))
    (want, want_metrics, want_grads), (got, got_metrics, got_grads) = results
    torch.testing.assert_close(got, want, **EXACT)
    for key, value in want_metrics.items():
        torch.testing.assert_close(got_metrics[key], value, **EXACT, msg=key)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **EXACT)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_a_pair_never_sees_another_pair(prefix_sharing):
    """Other tokens in one pair leave every other pair's log-probs bit-identical, in bf16 too (one row holds all)."""
    model = tiny_model(3, max_seq_len=64)
    batch = _batch(3)
    other = {k: v.clone() for k, v in batch.items()}
    p = int(batch["prompt_len"][4])
    other["chosen"][4, :p] = other["rejected"][4, :p] = 1 + other["chosen"][4, :p] % 30  # another prompt for pair 4
    for bf16 in (False, True):
        scored = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for b in (batch, other):
                token_lp = score_batch(model, b, prefix_sharing=prefix_sharing, pad_id=PAD, pack_len=1000)
                scored.append(token_lp.sequence("sum"))
        keep = torch.arange(6) != 4
        for got, want in zip(scored[1], scored[0], strict=True):
            assert torch.equal(got[keep], want[keep])
            assert not torch.equal(got[4], want[4])  # pair 4 itself did change


def test_positions_restart_for_every_pair():
    batch = _batch(5)
    for prefix_sharing in (False, True):
        packed = pack_rows(*_lengths(batch), prefix_sharing=prefix_sharing, pack_len=1000)
        positions, flat = packed.positions.flatten(), packed.tokens.flatten()
        for b in range(6):  # each scored token sits at its position in its own [prompt, response] sequence
            p = int(batch["prompt_len"][b])
            for side in ("chosen", "rejected"):
                index, mask = getattr(packed, f"{side}_index")[b], getattr(packed, f"{side}_mask")[b]
                j = torch.arange(len(index))[mask]
                assert torch.equal(positions[index[mask]], p + j)
                assert torch.equal(flat[index[mask]], batch[side][b, p + j])


@pytest.mark.parametrize("long", [False, True])
def test_pair_tiles_equal_dense_mask_attention(long):
    """The CPU path (per-block tiles; short blocks grouped into one tile) equals SDPA under the dense (R, 1, L, L)
    mask, the GPU / compiled path and the Hugging Face 4-D mask: values and gradients in float64. Long: blocks past
    PAIR_GROUP_MAX get their own tiles, the second response over [prompt keys, its own keys] in halves."""
    n = 2 * PAIR_GROUP_MAX if long else 24
    for prefix_sharing in (False, True):
        batch = _batch(7, batch=5, n=n)
        packed = pack_rows(*_lengths(batch), prefix_sharing=prefix_sharing, pack_len=3 * n)
        blocks: PairBlocks = packed.attn_mask
        rows, width = packed.tokens.shape
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(rows, 2, width, 8, generator=g, dtype=torch.float64) for _ in range(3))
        grad = torch.randn(rows, 2, width, 8, generator=g, dtype=torch.float64)
        real = (blocks.block_ids >= 0)[:, None, :, None]  # padding queries: zeros on the tiled path
        outs = []
        for tiled in (True, False):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            if tiled:
                out = attend(*leaves, blocks, False, 0.0)
                assert type(out.grad_fn).__name__ == "_TiledAttentionBackward"
            else:
                out = F.scaled_dot_product_attention(*leaves, attn_mask=blocks.dense())
            out = out * real
            out.backward(grad)
            outs.append([out.detach()] + [x.grad for x in leaves])
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got, want, **EXACT)
        tiles = blocks.tiles(torch.float64, q.device)
        assert len(tiles) < (len(blocks.blocks) if not long else 10**6)  # short blocks share tiles
        if long:
            assert any(len(t.key_ranges) == 2 for t in tiles) == prefix_sharing


def test_flex_attention_block_mask_equals_the_dense_mask():
    """The FlexAttention path (`PACKED_CUDA_ATTENTION = "flex"` on CUDA) attends as the dense mask: its block mask,
    run here by PyTorch's eager reference implementation of FlexAttention (forward), on rows of both layouts."""
    import warnings

    from ray_dpo.core.attention import flex_attention

    for prefix_sharing in (False, True):
        batch = _batch(9, batch=5, n=24)
        blocks = pack_rows(*_lengths(batch), prefix_sharing=prefix_sharing, pack_len=60).attn_mask
        rows, width = blocks.block_ids.shape
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(rows, 2, width, 16, generator=g) for _ in range(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention says it is for checking only: what it does here
            got = flex_attention(q, k, v, block_mask=blocks.block_mask())
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=blocks.dense())
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_compiler")
def test_compiled_packed_policy_and_reference_match_eager():
    """`train.compile` with packing: compiled, packed rows run SDPA under the dense mask, built in the graph from
    tensors; loss and gradients equal the eager per-pair tiles."""
    policy, reference = tiny_model(13, depth=1), tiny_model(14, depth=1)
    eager, compiled = (
        DPO(copy.deepcopy(policy), pad_id=PAD, prefix_sharing=True, pack_len=64, ref_model=copy.deepcopy(reference))
        for _ in range(2)
    )
    compiled.policy_model, compiled.ref_model = torch.compile(compiled.policy_model), torch.compile(compiled.ref_model)
    batch, results = _batch(13, n=16), []
    for dpo in (eager, compiled):
        loss, _ = dpo.batch_loss(batch)
        loss.backward()
        results.append([loss.detach()] + [param.grad for param in dpo.parameters()])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# --- two DDP workers, packed, against one process, unpacked: float64, both model kinds ---------------------------


def _models(kind: str, hf_dir: str | None):
    """A policy that differs from its reference, float64: ours, or the tiny Hugging Face Qwen2."""
    if kind == "ours":
        torch.set_default_dtype(torch.float64)
        try:
            return tiny_model(31, max_seq_len=64), tiny_model(32, max_seq_len=64)
        finally:
            torch.set_default_dtype(torch.float32)
    from transformers import AutoModelForCausalLM

    policy, reference = (AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(31)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return policy.eval(), reference.eval()


def _wrapped(model):
    from ray_dpo.core.logps import LogpsModel

    return LogpsModel(model)  # the module a trainer wraps in DDP, for every model kind


SETTINGS = [(kind, prefix_sharing) for kind in ("ours", "hf") for prefix_sharing in (False, True)]


def _ddp_rank(rank: int, world: int, port: int, hf_dir: str, out: str) -> None:
    """One DDP rank: its micro-batch of the global batch, packed, backpropagating loss_sum * W / global_count as the
    training loop does; DDP averages the gradients."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for kind, prefix_sharing in SETTINGS:
        policy, reference = _models(kind, hf_dir)
        ddp = DistributedDataParallel(_wrapped(policy))
        dpo = DPO(ddp, ref_model=_wrapped(reference), pad_id=PAD, prefix_sharing=prefix_sharing, pack_len=40)
        batch = _batch(41, batch=8, n=20)
        mine = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}  # micro-batches 0 and 1
        loss, _ = dpo.batch_loss(mine)
        (loss * 4 * world / 8).backward()
        results[(kind, prefix_sharing)] = (loss.detach() * 4, [p.grad for p in policy.parameters()])
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ddp_workers_packed_equal_one_process_unpacked(tmp_path):
    """float64 under DDP with 2 gloo ranks, packed (pack_len 40: several rows per micro-batch), for our model and the
    tiny Hugging Face Qwen2, with and without prefix sharing: the loss and every gradient of one process scoring the
    same 8 pairs unpacked (two plain sequences per pair)."""
    import socket

    import torch.multiprocessing as mp
    from tiny_hf import build

    hf_dir = str(build(tmp_path / "hf", arch="qwen2", vocab_size=400))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, hf_dir, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for kind, prefix_sharing in SETTINGS:
        policy, reference = _models(kind, hf_dir)
        dpo = DPO(_wrapped(policy), ref_model=_wrapped(reference), pad_id=PAD)
        loss, _ = dpo.batch_loss(_batch(41, batch=8, n=20))
        loss.backward()
        (sum0, grads0), (sum1, grads1) = ranks[0][(kind, prefix_sharing)], ranks[1][(kind, prefix_sharing)]
        # transformers' Qwen2 takes RMSNorm in float32 even for float64 weights: an input that differs in its last
        # float64 bit (another summation order over other keys) can round to another float32
        tol = EXACT if kind == "ours" else dict(atol=1e-7, rtol=1e-5)
        torch.testing.assert_close((sum0 + sum1) / 8, loss.detach(), **tol)
        for got_0, got_1, param in zip(grads0, grads1, policy.parameters(), strict=True):
            assert torch.equal(got_0, got_1)  # DDP's averaged gradient: the same on both ranks
            torch.testing.assert_close(got_0, param.grad, **tol)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_rows_of_hf_llama_and_mistral_score_as_unpacked(arch):
    """The other Hugging Face architectures packing takes (Qwen2: tests/test_hf.py and the DDP test above): packed
    rows, with and without prefix sharing, give every pair's unpacked log-probs (float64; Mistral's sliding window
    longer than the rows, as its default)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from ray_dpo.core.logps import LogpsModel

    config, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LogpsModel(cls(config(vocab_size=64, max_position_embeddings=64, **size)).double().eval())
    batch = _batch(17)
    with torch.no_grad():
        want = score_batch(model, batch, pad_id=PAD).sequence("sum")
        for prefix_sharing in (False, True):
            got = score_batch(model, batch, prefix_sharing=prefix_sharing, pad_id=PAD, pack_len=48).sequence("sum")
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5)
