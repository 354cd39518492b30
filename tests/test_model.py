import pytest
import torch
import torch.nn.functional as F

import ray_dpo.model as model_lib
from ray_dpo.model import ModelConfig, TransformerLM, attend, matmul_attention

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


@pytest.mark.parametrize("kind", ["causal", "mask", "cache"])
def test_cpu_bf16_matmul_attention_matches_float64_sdpa(kind):
    """bf16 on CPU takes the matmul path: outputs and gradients match SDPA in float64 to bf16 precision."""
    g = torch.Generator().manual_seed(0)
    queries, keys = (8, 24) if kind == "cache" else (24, 24)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).bfloat16() for n in (queries, keys, keys))
    mask, is_causal = None, kind == "causal"
    if kind == "mask":  # causal minus a padded key of row 1
        mask = torch.ones(2, 1, keys, keys, dtype=torch.bool).tril()
        mask[1, :, 5:, 3] = False
    if kind == "cache":  # 8 new queries after 16 cached keys: bottom-right causal
        mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    grad_out = torch.randn(2, 3, queries, 16, generator=g)
    results = []
    for dtype in (torch.bfloat16, torch.float64):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = attend(*leaves, mask, is_causal, 0.0)
        out.backward(grad_out.to(dtype))
        results.append([out.double()] + [x.grad.double() for x in leaves])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    assert (results[0][0] - results[1][0]).abs().max() > 0  # bf16 really ran in bf16 (not upcast)
    assert torch.equal(attend(q, k, v, mask, is_causal, 0.0), matmul_attention(q, k, v, mask, is_causal, 0.0))


def test_gradient_checkpointing_gives_the_same_gradients():
    """`model.gradient_checkpointing`: activations recomputed in backward, same loss and gradients (fp32, 1e-6)."""
    from ray_dpo.models import enable_gradient_checkpointing

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


def test_compiled_model_forward_and_backward_equal_eager():
    """`train.compile`: torch.compile keeps the oneDNN fp32 matmuls (a custom op, no graph break) and gives eager's
    logits and gradients to 1e-5."""
    torch.manual_seed(0)
    model = TransformerLM(CONFIG)
    tokens = torch.randint(0, 50, (3, 12))
    grad = torch.linspace(-1, 1, 3 * 12 * 50).reshape(3, 12, 50)
    results = []
    for forward in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        logits = forward(tokens)
        logits.backward(grad)
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
