import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import ray_dpo.core.kernels as model_lib
from ray_dpo.core.attention import attend, matmul_attention
from ray_dpo.core.kernels import rope_tables, rotary_qkv
from ray_dpo.core.model import ModelConfig, RMSNorm, TransformerLM

CONFIG = ModelConfig(vocab_size=50, max_seq_len=64, dim=32, depth=2, heads=4)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TransformerLM(CONFIG).eval()


def test_shapes_and_causality(model):
    tokens = torch.randint(0, 50, (3, 12))
    logits = model(tokens)
    assert logits.shape == (3, 12, 50)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50  # the future must not change the past
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8])
    assert not torch.allclose(model(changed)[:, 8:], logits[:, 8:])


def test_kv_cache_chunks_equal_full_forward(model):
    tokens = torch.randint(0, 50, (2, 20))
    full = model(tokens)
    cache = model.init_cache(2, 32)
    pieces = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20


def test_kv_cache_overflow_is_an_error(model):
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_explicit_mask_and_positions(model):
    tokens = torch.randint(0, 50, (2, 10))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(model(tokens, attn_mask=causal), model(tokens), atol=1e-5, rtol=1e-5)
    # RoPE encodes relative positions: shifting every position by a constant leaves logits unchanged
    shifted = torch.arange(10) + 7
    torch.testing.assert_close(model(tokens, positions=shifted), model(tokens), atol=1e-4, rtol=1e-4)
    beyond = torch.arange(10) + CONFIG.max_seq_len  # positions past max_seq_len (packed rows) stay valid
    torch.testing.assert_close(model(tokens, positions=beyond), model(tokens), atol=1e-3, rtol=1e-3)


def test_tied_embeddings_and_param_count():
    tied = TransformerLM(CONFIG)
    assert tied.to_logits.weight is tied.token_emb.weight
    untied = TransformerLM(ModelConfig(**{**CONFIG.__dict__, "tie_embeddings": False}))
    assert untied.num_params() == tied.num_params() + 50 * 32
    hidden = CONFIG.ff_hidden
    per_block = 4 * 32 * 32 + 3 * 32 * hidden + 2 * 32
    assert tied.num_params() == 50 * 32 + 2 * per_block + 32


def test_flops_per_token_formula():
    m = TransformerLM(CONFIG)
    matmuls = 2 * (4 * 32 * 32 + 3 * 32 * CONFIG.ff_hidden) + 50 * 32
    seq = 16
    assert m.flops_per_token(seq, training=False) == 2 * matmuls + 4 * 2 * seq * 32
    assert m.flops_per_token(seq) == 3 * m.flops_per_token(seq, training=False)


def test_bf16_autocast_runs(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 50, (2, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_bad_head_split_is_a_clear_error():
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(dim=30, heads=4)


@pytest.mark.parametrize("kind", ["causal", "long_causal", "mask", "per_head", "cache"])
def test_cpu_bf16_matmul_attention_matches_float64_sdpa(kind):
    """bf16 on CPU takes the matmul path: outputs and gradients match SDPA in float64 to bf16 precision."""
    g = torch.Generator().manual_seed(0)
    queries, keys = {"cache": (8, 24), "long_causal": (300, 300)}.get(kind, (24, 24))  # 300: causal_tiles
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).bfloat16() for n in (queries, keys, keys))
    mask, is_causal = None, kind in ("causal", "long_causal")
    if kind == "mask":  # causal minus a padded key of row 1
        mask = torch.ones(2, 1, keys, keys, dtype=torch.bool).tril()
        mask[1, :, 5:, 3] = False
    if kind == "per_head":  # one mask per (row, head): added inside the scores matmul (baddbmm)
        mask = torch.ones(2, 3, keys, keys, dtype=torch.bool).tril()
        mask[0, 1, 10:, 2] = False
        mask[1, 2, 7:, 4:6] = False
    if kind == "cache":  # 8 new queries after 16 cached keys: bottom-right causal
        mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    grad_out = torch.randn(2, 3, queries, 16, generator=g)
    results = []
    for dtype in (torch.bfloat16, torch.float64):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = attend(*leaves, mask, is_causal, 0.0)
        out.backward(grad_out.to(dtype))
        results.append([out.double()] + [x.grad.double() for x in leaves])
        if dtype == torch.bfloat16:
            bf16_path = type(out.grad_fn).__name__
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    assert (results[0][0] - results[1][0]).abs().max() > 0  # bf16 really ran in bf16 (not upcast)
    if is_causal:  # causal self-attention: tile by tile (`causal_tiles`: 75 / 75 / 150 rows at 300)
        assert bf16_path == "_TiledAttentionBackward"
    else:
        assert torch.equal(attend(q, k, v, mask, is_causal, 0.0), matmul_attention(q, k, v, mask, is_causal, 0.0))


def test_cpu_rms_norm_equals_f_rms_norm_in_float64():
    """RMSNorm's written-out CPU backward: output and both gradients equal `F.rms_norm`'s autograd in float64
    (fp32 to 1e-5); under bf16 autocast it hands the next matmul bf16 directly."""
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(3, 5, 32, generator=g) * 3, torch.randn(3, 5, 32, generator=g)
    weight = torch.rand(32, generator=g) + 0.5
    want_x, want_w = x.double().requires_grad_(), weight.double().requires_grad_()
    want = F.rms_norm(want_x, (32,), want_w, 1e-6)
    want.backward(grad.double())
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        norm = RMSNorm(32).to(dtype)
        norm.weight.data.copy_(weight)
        got_x = x.to(dtype).requires_grad_()
        got = norm(got_x)
        got.backward(grad.to(dtype))
        assert type(got.grad_fn).__name__ == "_RMSNormCPUBackward"  # the written-out path ran
        for ours, reference in ((got, want), (got_x.grad, want_x.grad), (norm.weight.grad, want_w.grad)):
            torch.testing.assert_close(ours.double(), reference.detach(), atol=tol, rtol=tol)
    norm = RMSNorm(32)
    norm.weight.data.copy_(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want.detach(), atol=0.05, rtol=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_autograd(dtype):
    """The SwiGLU Function (one gradient buffer for gate and up) equals autograd through silu(gate) * up."""
    g = torch.Generator().manual_seed(0)
    gate_up, grad = torch.randn(4, 6, 32, generator=g).to(dtype), torch.randn(4, 6, 16, generator=g).to(dtype)
    ours = gate_up.clone().requires_grad_()
    out = model_lib.swiglu(ours)
    out.backward(grad)
    plain = gate_up.clone().requires_grad_()
    gate, up = plain.chunk(2, dim=-1)
    want = F.silu(gate) * up
    want.backward(grad)
    assert type(out.grad_fn).__name__ == "_SwiGLUBackward"
    assert torch.equal(out, want) and torch.equal(ours.grad, plain.grad)


@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_qkv_equals_textbook_rope_in_float64(per_row):
    """q, k rotated with signed-sin tables (into contiguous buffers), and the projection's gradient written by RoPE
    with -sin, equal x * cos + rotate_half(x) * sin through autograd; v passes through."""
    g = torch.Generator().manual_seed(0)
    heads, d = 2, 8
    qkv = torch.randn(3, 5, 3 * heads * d, generator=g, dtype=torch.float64)
    positions = torch.randint(0, 40, (3, 5), generator=g) if per_row else torch.arange(5)
    inv_freq = 10_000.0 ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = rope_tables(positions, inv_freq, torch.float64)
    freqs = positions.unsqueeze(-1).double() * inv_freq
    textbook_cos, textbook_sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    if per_row:  # (B, N, D) -> (B, 1, N, D): broadcast over heads
        cos, sin, textbook_cos, textbook_sin = (t.unsqueeze(1) for t in (cos, sin, textbook_cos, textbook_sin))
    ours = qkv.clone().requires_grad_()
    got = rotary_qkv(ours, cos, sin, heads)
    plain = qkv.clone().requires_grad_()
    q, k, v = rearrange(plain, "b n (three h d) -> three b h n d", three=3, h=heads)
    rotate_half = lambda x: torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    want = [x * textbook_cos + rotate_half(x) * textbook_sin for x in (q, k)] + [v]
    grads = [torch.randn(want[0].shape, generator=g, dtype=torch.float64) for _ in range(3)]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(want, grads)
    for ours_out, want_out in zip(got, want, strict=True):
        torch.testing.assert_close(ours_out, want_out)
    torch.testing.assert_close(ours.grad, plain.grad)
    assert got[0].is_contiguous() and got[1].is_contiguous()  # attention takes them as (B * H, N, D) views, no copy


def test_gradient_checkpointing_gives_the_same_gradients():
    """`model.gradient_checkpointing`: activations recomputed in backward, same loss and gradients (fp32, 1e-6)."""
    from ray_dpo.stages.models import enable_gradient_checkpointing

    torch.manual_seed(0)
    plain = TransformerLM(ModelConfig(vocab_size=64, max_seq_len=32, dim=32, depth=3, heads=4))
    checkpointed = TransformerLM(plain.config)
    checkpointed.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    tokens = torch.randint(0, 64, (3, 17))
    for model in (plain, checkpointed):
        model(tokens).log_softmax(-1).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-6, msg=name)


def _values_and_grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 2, out.numel()).reshape(out.shape))
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.skipif(not model_lib.ONEDNN_LINEAR, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16)])
def test_onednn_fp32_linear_equals_f_linear(shape):
    """The fp32 CPU matmuls (oneDNN): values and both gradients equal F.linear's (MKL) to fp32 summation order."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(*shape, generator=g), torch.randn(24, 16, generator=g)
    assert model_lib.use_onednn(x, weight)
    got = _values_and_grads(model_lib.linear, x, weight)
    want = _values_and_grads(F.linear, x, weight)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    strided = torch.randn(16, 5, generator=g).t()  # a transposed view is read as it is
    torch.testing.assert_close(model_lib.linear(strided, weight), F.linear(strided, weight), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast and other dtypes keep F.linear
        assert not model_lib.use_onednn(x, weight)
    assert not model_lib.use_onednn(x.double(), weight.double())


@pytest.mark.skipif(not model_lib.ONEDNN_LINEAR, reason="PyTorch built without oneDNN")
def test_model_logits_and_grads_equal_without_onednn(monkeypatch):
    """The whole fp32 training forward + backward through oneDNN equals the F.linear path to 1e-5."""
    torch.manual_seed(0)
    model = TransformerLM(CONFIG)
    tokens = torch.randint(0, 50, (3, 12))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        logits.backward(torch.linspace(-1, 1, logits.numel()).reshape(logits.shape))
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    got = run()
    monkeypatch.setattr(model_lib, "ONEDNN_LINEAR", False)
    want = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("fresh_compiler")
def test_compiled_model_forward_and_backward_equal_eager():
    """`train.compile`: torch.compile keeps the oneDNN fp32 matmuls (a custom op, no graph break) and gives eager's
    logits and gradients to 1e-5; a second row length recompiles with dynamic shapes and still does."""
    torch.manual_seed(0)
    model = TransformerLM(CONFIG)
    compiled = torch.compile(model, fullgraph=True)
    for length in (12, 9):
        tokens = torch.randint(0, 50, (3, length))
        grad = torch.linspace(-1, 1, 3 * length * 50).reshape(3, length, 50)
        results = []
        for forward in (model, compiled):
            model.zero_grad(set_to_none=True)
            logits = forward(tokens)
            logits.backward(grad)
            results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
        for eager, from_compiled in zip(*results, strict=True):
            torch.testing.assert_close(from_compiled, eager, atol=1e-5, rtol=1e-5)
