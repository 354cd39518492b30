"""Decoding: filters on hand-made logits, cached == uncached, batch independence, eos, beam search, contrastive;
the fused decode step (eager, packed, static, compiled) == the module forward."""

import math

import pytest
import torch
from torch import nn

import ray_dpo.core.decode_step as decode_step
from ray_dpo.core.compat import AutoregressiveWrapper
from ray_dpo.core.decode_step import PACK_MIN_BATCH, _packed
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.sampling import _Decoder, beam_search, contrastive_decode_fn, generate, min_p, top_a, top_k, top_p

VOCAB = 48
INF = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared machine (seconds instead of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(seed: int = 0) -> TransformerLM:
    """fp64 (no near-ties flip an argmax) with large random weights, so greedy output is varied, not one token."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, depth=2, heads=2, max_seq_len=64, tie_embeddings=False)
    model = TransformerLM(cfg).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0, 0.5 if "emb" in name else 0.2)
    return model


class Plain(nn.Module):
    """Any tokens -> logits module: no cache, no positions, no mask."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, tokens):
        return self.net(tokens)


class Table(nn.Module):
    """Next-token log-probs depend only on the last token: a hand-made Markov chain."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.register_buffer("log_probs", log_probs)
        self.calls = 0

    def forward(self, tokens):
        self.calls += 1
        return self.log_probs[tokens]


def prompts_of(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def seq_logp(model, prompt: torch.Tensor, continuation: torch.Tensor) -> float:
    """Summed log-prob of `continuation` after `prompt`, by one plain forward."""
    seq = torch.cat((prompt, continuation)).unsqueeze(0)
    logp = model(seq).log_softmax(-1)[0, len(prompt) - 1 : -1]
    return logp.gather(-1, continuation.unsqueeze(-1)).sum().item()


# ---------------------------------------------------------------------------------------------------- filters


def kept(filtered: torch.Tensor) -> set[int]:
    return set((filtered[0] > INF).nonzero().squeeze(-1).tolist())


def test_filters_keep_exactly_the_expected_set():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, -2.0]])
    assert kept(top_k(logits, k=2)) == {1, 3}
    assert kept(top_k(logits, frac_num_tokens=0.5)) == {1, 2, 3}  # ceil(2.5) = 3
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(logits, k=0)

    probs = torch.tensor([[0.04, 0.5, 0.15, 0.3, 0.01]])
    logits = probs.log()
    assert kept(top_p(logits, thres=0.7)) == {1, 3}  # 0.5 < 0.7, 0.5 + 0.3 crosses it: 0.3 is kept
    assert kept(top_p(logits, thres=0.85)) == {1, 2, 3}
    assert kept(top_p(logits, thres=0.4)) == {1}  # the top token alone already crosses
    assert kept(min_p(logits, min_p=0.1)) == {1, 2, 3}  # drop p < 0.05
    assert kept(min_p(logits, min_p=0.5)) == {1, 3}  # drop p < 0.25
    assert kept(top_a(logits, min_p_pow=2.0, min_p_ratio=0.5)) == {1, 2, 3}  # drop p < 0.125
    assert kept(top_a(logits, min_p_pow=1.0, min_p_ratio=0.5)) == {1, 3}  # drop p < 0.25
    for fn in (top_k, top_p, min_p, top_a):
        out = fn(logits)
        assert torch.equal(out[out > INF], logits[out > INF])  # survivors are untouched

    # any leading dims, rows independent
    batch = torch.stack((logits[0], logits[0].flip(-1))).unsqueeze(0)  # (1, 2, 5)
    assert torch.equal(top_p(batch, 0.7)[0, 1], top_p(logits.flip(-1), 0.7)[0])
    assert torch.equal(top_k(batch, k=2)[0, 1], top_k(logits.flip(-1), k=2)[0])


def test_contrastive_decode_matches_its_formula():
    expert = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    amateur = torch.tensor([[1.0, 3.0, 0.0, -1.0]])
    out = contrastive_decode_fn(expert, amateur, alpha=0.1, beta=0.5)
    # cutoff ln(0.1) + 2 = -0.303: token 2 (expert -1) is implausible; others (1.5 e - 0.5 a)
    lowest = -torch.finfo(torch.float32).max
    assert torch.equal(out, torch.tensor([[2.5, 0.0, lowest, 1.25]]))
    out = contrastive_decode_fn(expert, amateur, alpha=0.5, beta=1.0)  # cutoff 2 - 0.693: only token 0
    assert torch.equal(out, torch.tensor([[3.0, lowest, lowest, lowest]]))


def test_contrastive_generate_uses_the_formula_with_each_amateur_cached():
    expert, am1, am2 = tiny_lm(0), tiny_lm(1), tiny_lm(2)
    prompts = prompts_of([4, 7, 2])
    kw = [dict(alpha=0.1, beta=0.5), dict(alpha=0.2, beta=1.0)]
    out = generate(expert, prompts, 6, temperature=0, amateur_model=[am1, am2], contrastive_decode_kwargs=kw)
    for prompt, row in zip(prompts, out, strict=True):
        for t in range(len(row)):  # greedy step t = argmax of the chained formula on the full prefix
            seq = torch.cat((prompt, row[:t])).unsqueeze(0)
            logits = contrastive_decode_fn(expert(seq)[:, -1], am1(seq)[:, -1], **kw[0])
            logits = contrastive_decode_fn(logits, am2(seq)[:, -1], **kw[1])
            assert logits.argmax(-1).item() == row[t].item()
    plain = generate(expert, prompts, 6, temperature=0)
    assert not torch.equal(out, plain)  # the amateurs did change the decoding
    uncached = generate(
        expert, prompts, 6, temperature=0, amateur_model=[am1, am2], contrastive_decode_kwargs=kw, cache_kv=False
    )
    assert torch.equal(out, uncached)


# ---------------------------------------------------------------------------------------------------- cache, padding


def test_greedy_cached_equals_uncached_for_mixed_prompt_lengths():
    model = tiny_lm()
    prompts = prompts_of([5, 9, 1, 9, 3])
    cached = generate(model, prompts, 20, temperature=0)
    uncached = generate(model, prompts, 20, temperature=0, cache_kv=False)
    assert cached.shape == (5, 20)
    assert torch.equal(cached, uncached)
    # and the same as decoding each row by hand with plain full forwards
    for prompt, row in zip(prompts, cached, strict=True):
        seq = prompt
        for _ in range(20):
            seq = torch.cat((seq, model(seq.unsqueeze(0))[0, -1].argmax().view(1)))
        assert torch.equal(seq[len(prompt) :], row)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_row_generates_what_it_generates_alone(padding_side):
    model = tiny_lm()
    prompts = prompts_of([6, 2, 4])
    lens = torch.tensor([len(p) for p in prompts])
    padded = torch.full((3, 8), 7)  # two extra pad columns, and pad value 7 is a real token: must be masked
    for i, p in enumerate(prompts):
        if padding_side == "right":
            padded[i, : len(p)] = p
        else:
            padded[i, 8 - len(p) :] = p
    for cache_kv in (True, False):
        batch = generate(
            model, padded, 12, temperature=0, prompt_lens=lens, padding_side=padding_side, cache_kv=cache_kv
        )
        for prompt, row in zip(prompts, batch, strict=True):
            alone = generate(model, prompt.unsqueeze(0), 12, temperature=0, cache_kv=cache_kv)
            assert torch.equal(row, alone[0])


def test_module_without_cache_api_groups_rows_by_prompt_length():
    model = tiny_lm()
    plain = Plain(model)
    prompts = prompts_of([5, 3, 5, 2])
    out = generate(plain, prompts, 10, temperature=0)
    assert torch.equal(out, generate(model, prompts, 10, temperature=0))
    beams = beam_search(plain, prompts, 6, beams=3)
    assert torch.equal(beams, beam_search(model, prompts, 6, beams=3))


# ---------------------------------------------------------------------------------------------------- sampling


def test_sampling_reproducible_with_generator_and_cache_independent():
    model = tiny_lm()
    prompts = prompts_of([5, 9, 3])

    def sample(seed, **kw):
        return generate(model, prompts, 16, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(
        sample(3, filter_logits_fn="top_p", filter_kwargs=dict(thres=0.8)),
        sample(3, filter_logits_fn="top_p", filter_kwargs=dict(thres=0.8), cache_kv=False),
    )
    assert torch.equal(
        sample(4, temperature=0.7, filter_logits_fn="min_p"), sample(4, temperature=0.7, filter_logits_fn="min_p")
    )


def test_top_k_1_and_one_beam_equal_greedy():
    model = tiny_lm()
    prompts = prompts_of([5, 9, 3])
    greedy = generate(model, prompts, 16, temperature=0)
    top1 = generate(
        model,
        prompts,
        16,
        filter_logits_fn="top_k",
        filter_kwargs=dict(k=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(top1, greedy)
    assert torch.equal(beam_search(model, prompts, 16, beams=1), greedy)


def test_sampling_respects_the_filter():
    # 2 allowed tokens: every sample must be one of them
    log_probs = torch.full((VOCAB, VOCAB), -10.0)
    log_probs[:, 3], log_probs[:, 9] = 0.0, -0.5
    out = generate(
        Table(log_probs),
        torch.zeros(16, 1, dtype=torch.long),
        8,
        filter_logits_fn="top_k",
        filter_kwargs=dict(k=2),
        generator=torch.Generator().manual_seed(0),
    )
    assert set(out.unique().tolist()) == {3, 9}


# ---------------------------------------------------------------------------------------------------- eos


def test_eos_stops_each_row_and_the_loop():
    model = tiny_lm()
    prompts = prompts_of([5, 9, 3, 4])
    free = generate(model, prompts, 24, temperature=0)
    eos = int(free[0, 3])  # row 0 first emits this token at some step <= 3
    prompts[1] = torch.cat((prompts[1][:-1], torch.tensor([eos]), prompts[1][-1:]))  # eos inside a prompt
    free = generate(model, prompts, 24, temperature=0)
    first = [(row == eos).nonzero() for row in free]
    out = generate(model, prompts, 24, temperature=0, eos_token=eos, pad_id=-1)
    stops = [int(f[0]) + 1 if len(f) else 24 for f in first]
    assert out.shape == (4, max(stops))  # trimmed to the longest row; loop ends once all have finished
    for row, free_row, stop in zip(out, free, stops, strict=True):
        assert torch.equal(row[:stop], free_row[:stop])  # identical up to and including its own eos
        assert (row[stop:] == -1).all()
    assert stops[0] <= 4 and max(stops) > stops[0]  # rows stop at their own eos, not the batch's first
    assert torch.equal(out, generate(model, prompts, 24, temperature=0, eos_token=eos, pad_id=-1, cache_kv=False))


def test_loop_ends_early_when_all_rows_finish():
    log_probs = torch.full((VOCAB, VOCAB), -5.0)
    log_probs[:, 2] = 0.0  # everything -> 2 (eos) ...
    log_probs[7, 2], log_probs[7, 9] = -5.0, 0.0  # ... except 7 -> 9 -> 2
    table = Table(log_probs)
    out = generate(table, [torch.tensor([2, 3]), torch.tensor([5, 7])], 50, temperature=0, eos_token=2, pad_id=-1)
    assert torch.equal(out, torch.tensor([[2, -1], [9, 2]]))  # the eos in prompt 0 did not end it
    assert table.calls == 2  # prefill + one step, not 50


# ---------------------------------------------------------------------------------------------------- beam search


def test_beam_search_scores_are_log_probs_and_cache_independent():
    model = tiny_lm()
    prompts = prompts_of([5, 9, 3, 6])
    best, scores = beam_search(model, prompts, 10, beams=4, return_beams_and_scores=True)
    assert best.shape == (4, 4, 10) and scores.shape == (4, 4)
    assert (scores[:-1] >= scores[1:]).all()  # beams sorted best first
    for beam in range(4):
        for i, prompt in enumerate(prompts):  # no eos: the score is the summed log-prob of the continuation
            assert math.isclose(scores[beam, i].item(), seq_logp(model, prompt, best[beam, i]), rel_tol=1e-9)
    assert torch.equal(beam_search(model, prompts, 10, beams=4, cache_kv=False), best[0])


def test_beam_search_beats_greedy():
    # the classic trap: greedy takes 1 (p=0.6) then faces a flat distribution; 3 (p=0.4) leads to a sure token
    log_probs = torch.full((VOCAB, VOCAB), -30.0)
    log_probs[0, 1], log_probs[0, 3] = math.log(0.6), math.log(0.4)
    log_probs[1, 8:] = math.log(1 / 40)
    log_probs[3, 4] = 0.0
    log_probs[4:, 4] = 0.0
    table, prompt = Table(log_probs), torch.zeros(1, 1, dtype=torch.long)
    greedy = generate(table, prompt, 3, temperature=0)
    best = beam_search(table, prompt, 3, beams=4)
    assert greedy[0, 0] == 1 and torch.equal(best[0], torch.tensor([3, 4, 4]))
    assert seq_logp(table, prompt[0], best[0]) > seq_logp(table, prompt[0], greedy[0])

    # on the tiny LM over 2 steps: greedy's path is always among 4 beams' final candidates, so they can't do
    # worse; with beams = vocab the search is exhaustive and must find the best of all VOCAB**2 continuations
    model = tiny_lm()
    prompts = prompts_of([5, 3, 6])
    greedy = generate(model, prompts, 2, temperature=0)
    four = beam_search(model, prompts, 2, beams=4)
    exact = beam_search(model, prompts, 2, beams=VOCAB)
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
    for i, prompt in enumerate(prompts):
        seqs = torch.cat((prompt.expand(len(pairs), -1), pairs), dim=1)
        logp = model(seqs).log_softmax(-1)[:, len(prompt) - 1 : -1].gather(-1, pairs.unsqueeze(-1)).sum((1, 2))
        assert torch.equal(exact[i], pairs[logp.argmax()])
        assert seq_logp(model, prompt, four[i]) >= seq_logp(model, prompt, greedy[i]) - 1e-12


def test_beam_search_keeps_finished_hypotheses():
    # token 0 -> eos (p=0.4) or 1 (p=0.6); after 1 the next token is spread over 40 tokens: stopping is better
    log_probs = torch.full((VOCAB, VOCAB), -30.0)
    log_probs[0, 2], log_probs[0, 1] = math.log(0.4), math.log(0.6)
    log_probs[1, 8:] = math.log(1 / 40)
    log_probs[8:, 5] = 0.0
    log_probs[5, 5] = 0.0
    table = Table(log_probs)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    assert generate(table, prompt, 4, temperature=0)[0, 0] == 1  # greedy walks past the eos
    out, scores = beam_search(table, prompt, 4, beams=2, eos_token=2, pad_id=-1, return_beams_and_scores=True)
    assert torch.equal(out[0, 0], torch.tensor([2, -1, -1, -1]))  # the finished beam is kept and wins
    assert math.isclose(scores[0, 0].item(), math.log(0.4), rel_tol=1e-6)
    # the runner-up ran to full length; its score is its log-prob / length (length_penalty=1)
    assert math.isclose(scores[1, 0].item(), (math.log(0.6) + math.log(1 / 40)) / 4, rel_tol=1e-6)
    # with no length penalty, shorter is even more favoured; with eos_token=None the eos is just a token
    assert beam_search(table, prompt, 4, beams=2, eos_token=None)[0, 0] == 1


def test_beam_search_with_eos_scores_are_normalised_log_probs():
    model = tiny_lm()
    prompts = prompts_of([5, 9, 3])
    eos = int(generate(model, prompts, 4, temperature=0)[0, 1])
    out, scores = beam_search(
        model, prompts, 12, beams=4, eos_token=eos, pad_id=-1, return_beams_and_scores=True, length_penalty=0.7
    )
    assert (scores[:-1] >= scores[1:]).all()
    n_finished = 0
    for beam in range(4):
        for i, prompt in enumerate(prompts):
            hyp = out[beam, i][out[beam, i] != -1]
            assert (hyp[:-1] != eos).all()  # nothing after an eos
            n_finished += int(hyp[-1] == eos)
            expected = seq_logp(model, prompt, hyp) / len(hyp) ** 0.7
            assert math.isclose(scores[beam, i].item(), expected, rel_tol=1e-9)
    assert n_finished > 0
    assert torch.equal(
        out,
        beam_search(
            model,
            prompts,
            12,
            beams=4,
            eos_token=eos,
            pad_id=-1,
            return_beams_and_scores=True,
            length_penalty=0.7,
            cache_kv=False,
        )[0],
    )


# ---------------------------------------------------------------------------------------------------- seed wrapper


def test_wrapper_runs_seed_code_and_matches_x_transformers():
    from x_transformers import AutoregressiveWrapper as SeedWrapper
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=VOCAB, max_seq_len=64, attn_layers=Decoder(dim=32, depth=1, heads=2, rotary_pos_emb=True)
    )
    prompts = torch.randint(0, VOCAB, (3, 5))
    ours, seed = AutoregressiveWrapper(net), SeedWrapper(net)
    assert torch.equal(
        ours.generate(prompts, 8, temperature=0.0), seed.generate(prompts, 8, temperature=0.0, cache_kv=False)
    )
    assert torch.equal(ours.beam_search(prompts, 6, beams=3), seed.beam_search(prompts, 6, beams=3, cache_kv=False))
    out = ours.generate(prompts[0], 8, filter_logits_fn="top_p", filter_kwargs=dict(thres=0.9))  # (N,) prompt
    assert out.shape == (8,)
    assert torch.allclose(ours(prompts), seed(prompts))  # the training loss

    lm = AutoregressiveWrapper(tiny_lm())
    gen = torch.Generator().manual_seed(0)
    sampled = lm.generate(prompts, 8, generator=gen)  # seed default filter: top_k(frac 0.1)
    assert torch.equal(
        sampled, generate(lm.net, prompts, 8, filter_logits_fn="top_k", generator=torch.Generator().manual_seed(0))
    )
    beams, scores = lm.beam_search(prompts[1], 6, beams=2, return_beams_and_scores=True)
    assert beams.shape == (2, 6) and scores.shape == (2,)
    assert lm.training and lm.net.training  # eval during decoding, restored after


# ---------------------------------------------------------------------------------------------------- decode step


class Unfused(TransformerLM):
    """Same model, forward overridden: generate() cannot assume the math, so it steps through the module forward."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def unfused(model: TransformerLM) -> Unfused:
    twin = Unfused(model.config).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def decode_cases(model, amateur):
    """Every loop the fused step serves: mixed-length greedy, eos, sampling, beam search (+ eos), contrastive."""
    prompts = prompts_of([5, 9, 1, 9, 3])
    eos = int(generate(model, prompts, 4, temperature=0)[0, 2])
    sample = dict(filter_logits_fn="top_p", filter_kwargs=dict(thres=0.8))
    return {
        "greedy": lambda m, **kw: generate(m, prompts, 20, temperature=0, **kw),
        "eos": lambda m, **kw: generate(m, prompts, 20, temperature=0, eos_token=eos, pad_id=-1, **kw),
        "top_p": lambda m, **kw: generate(m, prompts, 16, generator=torch.Generator().manual_seed(0), **sample, **kw),
        "beams": lambda m, **kw: beam_search(
            m, prompts, 10, beams=3, eos_token=eos, pad_id=-1, return_beams_and_scores=True, **kw
        )[0],
        "contrastive": lambda m, **kw: generate(m, prompts, 12, temperature=0, amateur_model=amateur, **kw),
    }


def test_fused_step_equals_the_module_forward():
    """The fused decode step re-implements TransformerLM.forward: same logits, same tokens in every loop."""
    model, amateur = tiny_lm(0), tiny_lm(1)
    twin = unfused(model)
    for name, run in decode_cases(model, amateur).items():
        assert torch.equal(run(model), run(twin)), name
    prompts = prompts_of([5, 9, 3])
    tokens, lens = torch.zeros(3, 9, dtype=torch.long), torch.tensor([5, 9, 3])
    for row, p in enumerate(prompts):
        tokens[row, 9 - len(p) :] = p
    with torch.inference_mode():
        fused, plain = (_Decoder(m, tokens, lens, 6, True, None) for m in (model, twin))
        assert fused.fused is not None and plain.fused is None
        torch.testing.assert_close(fused.prefill(), plain.prefill(), rtol=0, atol=0)
        for t in range(6):
            token = torch.tensor([t, 2 * t, 3])
            torch.testing.assert_close(fused.step(token), plain.step(token), rtol=1e-12, atol=1e-12)


def fp32_lm(seed: int = 0) -> TransformerLM:
    return tiny_lm(seed).float()


def test_packed_weights_fp32_equal_the_module_forward():
    """fp32 on CPU from PACK_MIN_BATCH rows: oneDNN-prepacked matmuls; packed once per model and weights."""
    model, amateur = fp32_lm(0), fp32_lm(1)
    twin = unfused(model)
    for name, run in decode_cases(model, amateur).items():
        assert torch.equal(run(model), run(twin)), name
    prompts = prompts_of([5, 9, 1, 9, 3, 7, 2, 8, 6, 4])
    assert len(prompts) >= PACK_MIN_BATCH
    out = generate(model, prompts, 16, temperature=0)
    packed = _packed[model][1]
    assert packed[0].is_mkldnn
    assert torch.equal(out, generate(twin, prompts, 16, temperature=0))
    assert torch.equal(out, generate(model, prompts, 16, temperature=0, cache_kv=False))
    assert torch.equal(generate(model, prompts, 16, temperature=0), out) and _packed[model][1] is packed  # reused
    with torch.no_grad():
        model.blocks[0].ff.to_out.weight.mul_(-1)  # weights changed in place: packed again, and it shows
    changed = generate(model, prompts, 16, temperature=0)
    assert _packed[model][1] is not packed and not torch.equal(changed, out)
    assert torch.equal(changed, generate(unfused(model), prompts, 16, temperature=0))


def test_static_step_equals_eager(monkeypatch):
    """The shape-static step (whole-cache attention, position as a tensor) that compile and CUDA graphs run,
    here uncompiled: the same tokens as the eager step in every loop."""
    monkeypatch.setattr(decode_step, "_compiled_static_step", decode_step._static_step)
    model, amateur = tiny_lm(0), tiny_lm(1)
    for name, run in decode_cases(model, amateur).items():
        assert torch.equal(run(model, decode="compile"), run(model)), name


@pytest.mark.usefixtures("fresh_compiler")
def test_compiled_step_equals_eager():
    """torch.compile of the static step: the same tokens as eager (one shape: compiling costs seconds)."""
    model = fp32_lm()
    prompts = prompts_of([5, 9, 1, 9, 3])
    out = generate(model, prompts, 12, temperature=0, decode="compile")
    assert torch.equal(out, generate(model, prompts, 12, temperature=0))


def test_decode_mode_errors():
    model, prompts = tiny_lm(), prompts_of([3, 4])
    with pytest.raises(ValueError, match="decode must be"):
        generate(model, prompts, 4, decode="cuda_graph")
    with pytest.raises(ValueError, match="decode must be"):
        generate(model, prompts, 4, decode="fast")
    with pytest.raises(ValueError, match="needs a TransformerLM"):
        generate(unfused(model), prompts, 4, decode="compile")
    with pytest.raises(ValueError, match="needs a TransformerLM"):
        generate(model, prompts, 4, decode="compile", cache_kv=False)


def test_kv_cache_reorder_keeps_its_storage():
    model = tiny_lm()
    cache = model.init_cache(3, 16)
    model(torch.randint(0, VOCAB, (3, 5)), cache=cache)
    keys, before = cache.keys, cache.keys.clone()
    rows = torch.tensor([2, 0, 0])
    cache.reorder(rows)
    assert cache.keys is keys  # same batch size: in place
    assert torch.equal(keys[:, :, :, :5], before.index_select(1, rows)[:, :, :, :5])
    cache.reorder(torch.tensor([0, 1, 1, 2, 2, 2]))  # a new batch size (beam search's first step) allocates
    assert cache.keys.shape[1] == 6 and cache.shape[1] == 6
