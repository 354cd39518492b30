"""DPO training step, ours vs x-transformers' own `DPO` at equal precision: s/step, tokens/s, MFU.

    python benchmarks/dpo_step.py [--rounds 10] [--hh-rounds 3] [--no-compile] [--xt-compile] [--out PATH]
    python benchmarks/dpo_step.py --smoke --out /tmp/dpo_step.json     # tiny shapes, every code path, < 30 s

Ours is what the trainer runs: `ray_dpo.DPO(TransformerLM, prefix_sharing=True)` with a live reference (a frozen
deep copy, in bf16 for bf16 runs as on a training worker), `DPO.batch_loss`, backward and a fused AdamW step; "+
compile" also wraps the policy and the reference in `torch.compile` (what `train.compile=true` does). "concatenated"
is ours without prefix sharing (context). "fp32 ours, MKL matmuls" is ours with `core.kernels.linear`'s oneDNN path
switched off (`F.linear`, which runs fp32 CPU matmuls in MKL): the A/B that justifies that path.
x-transformers: `x_transformers.dpo.DPO` on its own `TransformerWrapper(Decoder)` of the same width, depth, heads
and vocabulary (its defaults: learned absolute positions, LayerNorm, GELU MLP of 4 x dim), AdamW. Both run in fp32,
and both under `torch.autocast("cpu", torch.bfloat16)` (fp32 master weights, bf16 matmuls) for "bf16".

Workloads: the synthetic shape (dim 256, depth 4, heads 4, vocab 256; 8 pairs of 256 tokens sharing a 64-token
prompt, both responses filling the row) and HH-RLHF batches of 8 (the repository's sample, byte tokens, prompt
<= 384 kept from its end, sequence <= 512).

Timing. Each round runs every setting once (one step, or one pass over the HH batches) and measures the matmul
peaks, so load from other jobs on a shared machine falls on all settings alike. Reported: the median wall seconds
per step; "vs x-transformers" = the median over rounds of (x-transformers' time / ours) in the same round and
precision; process CPU seconds per step (all threads; robust to time-slicing, not to threads spinning while they
wait for a core); minor page faults per step; the load average before and after. The process keeps freed memory for
reuse, as a training worker does (`ray_dpo.stages.models.reuse_freed_memory`), for every setting alike: with glibc's
defaults, whichever setting runs after larger allocations is spared the page faults and the others pay them (here
~10k per x-transformers step, ~40k per eager step of ours run alone), which is the allocator's doing, not the model's.

FLOPs are counted as executed (PaLM appendix B): 2 x matmul weights per token each layer is fed (the output
projection only where it runs: every position for x-transformers, scored tokens for ours; our last block's output
projection and feed-forward only from the first scored position on, `hidden_from`), plus 4 x depth x dim per
(query, key) pair attention multiplies (no causal discount, as PaLM / nanoGPT: our bf16 attention tiles, which skip
the key blocks a causal mask hides, execute fewer than that). A step = policy forward + backward
(3 x forward) + reference forward (1 x). MFU = those FLOPs / median step time / the fastest matmul of that dtype
measured in the same run (fp32: the faster of torch.matmul, which is MKL, and oneDNN; bf16: torch.matmul = oneDNN).
tokens/s counts each pair's real tokens with the prompt in both sequences, no pads: sum(2 p + c + r) per step, the
same numerator for every setting of a workload.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_info, load_average, matmul_peak, print_table, setup, write_json  # noqa: E402

import ray_dpo.core.kernels as model_lib  # noqa: E402
from ray_dpo.core.dpo import DPO  # noqa: E402
from ray_dpo.core.logps import LogpsModel  # noqa: E402
from ray_dpo.core.model import ModelConfig, TransformerLM  # noqa: E402
from ray_dpo.core.pairs import layout_tokens, pack_pairs, response_mask_from_lengths  # noqa: E402
from ray_dpo.core.tokenizer import ByteTokenizer  # noqa: E402
from ray_dpo.stages.data.order import bucket_sort_key  # noqa: E402
from ray_dpo.stages.models import reuse_freed_memory  # noqa: E402

HH_PATH = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf" / "hh_rlhf_harmless_train_1812.parquet"
FULL = dict(dim=256, depth=4, heads=4, vocab=256, batch=8, seq=256, prompt=64, hh_len=512, hh_prompt=384)
SMOKE = dict(dim=64, depth=2, heads=2, vocab=256, batch=2, seq=48, prompt=12, hh_len=64, hh_prompt=32)
TARGETS = {"fp32": 1.2, "bf16": 1.3}  # ours / x-transformers speed at equal precision: the targets set for it
MFU_TARGET_BF16 = 0.6


# --- batches in the training contract --------------------------------------------------------------------------------


def synthetic_batch(batch: int, seq: int, prompt: int, vocab: int, seed: int = 0) -> dict[str, Tensor]:
    """Random pairs: a shared `prompt`-token prompt, both responses filling the row to `seq`."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randint(0, vocab, (batch, seq), generator=g)
    rejected = torch.randint(0, vocab, (batch, seq), generator=g)
    rejected[:, :prompt] = chosen[:, :prompt]
    full = lambda n: torch.full((batch,), n, dtype=torch.long)
    return dict(
        chosen=chosen,
        rejected=rejected,
        prompt_len=full(prompt),
        chosen_len=full(seq - prompt),
        rejected_len=full(seq - prompt),
    )


def collate(prompts: list[np.ndarray], chosens: list[np.ndarray], rejecteds: list[np.ndarray], pad_id: int) -> dict:
    """Right-pad `[prompt, response]` rows to the batch's longest sequence (as the data stage's collate does)."""
    p = torch.tensor([len(x) for x in prompts])
    c, r = torch.tensor([len(x) for x in chosens]), torch.tensor([len(x) for x in rejecteds])
    n = int(torch.maximum(p + c, p + r).max())
    rows = lambda responses: torch.tensor(
        np.stack(
            [
                np.pad(np.concatenate((q, a)), (0, n - len(q) - len(a)), constant_values=pad_id)
                for q, a in zip(prompts, responses, strict=True)
            ]
        )
    )
    return dict(chosen=rows(chosens), rejected=rows(rejecteds), prompt_len=p, chosen_len=c, rejected_len=r)


def hh_rows(path: Path, max_len: int, max_prompt: int, rows: np.ndarray | None = None) -> tuple[list, list, list]:
    """HH-RLHF pairs as byte tokens: prompt left-truncated to `max_prompt`, responses cut at `max_len` (all rows, or
    `rows` in that order)."""
    table = pq.read_table(path, columns=["prompt", "chosen", "rejected"])
    tok = ByteTokenizer()
    order = np.arange(table.num_rows) if rows is None else rows
    cols = {name: tok.encode_batch([table.column(name)[int(i)].as_py() for i in order]) for name in table.column_names}
    prompts = [x[-max_prompt:] for x in cols["prompt"]]  # keep the end: the last turn and "Assistant:"
    chosens = [x[: max_len - len(q)] for q, x in zip(prompts, cols["chosen"], strict=True)]
    rejecteds = [x[: max_len - len(q)] for q, x in zip(prompts, cols["rejected"], strict=True)]
    return prompts, chosens, rejecteds


def hh_batches(path: Path, batch: int, n_batches: int, max_len: int, max_prompt: int, seed: int = 0) -> list[dict]:
    """HH-RLHF-shaped batches in random order: `hh_rows` of a seeded permutation."""
    rows = np.random.default_rng(seed).permutation(pq.read_metadata(path).num_rows)[: batch * n_batches]
    prompts, chosens, rejecteds = hh_rows(path, max_len, max_prompt, rows)
    sl = lambda xs, k: xs[k * batch : (k + 1) * batch]
    return [collate(sl(prompts, k), sl(chosens, k), sl(rejecteds, k), ByteTokenizer.pad_id) for k in range(n_batches)]


def bucketed_batches(path: Path, batch: int, max_len: int, max_prompt: int, window: int, seed: int = 0) -> list[dict]:
    """Every batch of an epoch of HH-RLHF pairs in `bucket_by_length`'s order (`data.length_bucket_window`): what a
    training worker's micro-batches hold."""
    prompts, chosens, rejecteds = hh_rows(path, max_len, max_prompt)
    table = pa.table({"prompt": prompts, "chosen": chosens, "rejected": rejecteds})
    order = np.argsort(bucket_sort_key(table, max(1, -(-table.num_rows // window)), seed), kind="stable")
    pick = lambda xs, k: [xs[i] for i in order[k * batch : (k + 1) * batch]]
    return [
        collate(pick(prompts, k), pick(chosens, k), pick(rejecteds, k), ByteTokenizer.pad_id)
        for k in range(len(order) // batch)
    ]


def pair_tokens(batch: dict) -> int:
    return int((2 * batch["prompt_len"] + batch["chosen_len"] + batch["rejected_len"]).sum())


# --- FLOPs --------------------------------------------------------------------------------------------------------


def linear_weights(model: nn.Module, head: nn.Linear, tail: nn.Module | None = None) -> tuple[int, int, int]:
    """(matmul weights of the body, of the output projection, of `tail`: the modules of the last block that run only
    from the first scored position on): every nn.Linear once (tied weights once)."""
    linears = lambda module: {id(m.weight): m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear)}
    body = sum(linears(model).values()) - head.weight.numel()
    return body, head.weight.numel(), 0 if tail is None else sum(linears(tail).values())


def step_flops(batch: dict, *, body: int, head: int, tail: int, depth: int, dim: int, layout: str) -> float:
    """Executed FLOPs of one DPO step (policy 3 x forward + reference 1 x) for a `layout`:

    "packed": ours with prefix sharing (`dpo.pack_pairs`): B rows of split + W tokens, split^2 + W (P + W) pairs
    each (split = max(p + longer response), W = max(shorter response), P = max(p)), head on scored tokens only.
    "concatenated": 2B rows of N - 1 tokens, (N - 1)^2 pairs each, head on scored tokens only (ours).
    "full_logits": as "concatenated", head on every position (x-transformers).
    Ours ("packed", "concatenated"): the `tail` weights skip each row's positions before the first scored one.
    """
    rows, n = batch["chosen"].shape
    lengths = [batch[k] for k in ("prompt_len", "chosen_len", "rejected_len")]
    scored = int(sum(response_mask_from_lengths(n, lengths[0], x)[:, 1:].sum() for x in lengths[1:]))
    if layout == "packed":
        packed = pack_pairs(batch["chosen"], batch["rejected"], *lengths)
        split, prompt = packed.attn_mask.split, packed.attn_mask.prompt_keys
        width = packed.tokens.shape[1] - split
        tokens, pairs = rows * (split + width), rows * (split**2 + width * (prompt + width))
    else:
        tokens, pairs = 2 * rows * (n - 1), 2 * rows * (n - 1) ** 2
    head_tokens = tokens if layout == "full_logits" else scored
    skipped = 0  # rows x positions before the first scored one (`hidden_from` in `logps.scored_logps`)
    if layout == "packed":
        skipped = rows * int(packed.last_prompt.min())
    elif layout == "concatenated":
        skipped = 2 * rows * max(int(lengths[0].min()) - 1, 0)
    forward = 2 * body * tokens - 2 * tail * skipped + 2 * head * head_tokens + 4 * depth * dim * pairs
    return 4 * forward


# --- steps --------------------------------------------------------------------------------------------------------


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def fp32_matmuls(onednn: bool):
    """`core.kernels.linear` as shipped (oneDNN for fp32 on CPU) or, with `onednn=False`, plain `F.linear` (MKL)."""
    shipped = model_lib.ONEDNN_LINEAR
    model_lib.ONEDNN_LINEAR = shipped and onednn
    try:
        yield
    finally:
        model_lib.ONEDNN_LINEAR = shipped


def our_step(
    model: nn.Module,
    *,
    prefix_sharing: bool,
    bf16: bool,
    compile: bool,
    pad_id: int,
    onednn: bool = True,
    pack_len: int | None = None,
) -> Callable:
    """`DPO.batch_loss` + backward + fused AdamW, as a training worker runs it: the live reference is a frozen copy,
    held in bf16 for bf16 runs (`ray_dpo.stages.train.tasks`); a Hugging Face model inside `LogpsModel`, as there."""
    reference = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
    policy = copy.deepcopy(model)
    if not isinstance(model, TransformerLM):
        policy, reference = LogpsModel(policy), LogpsModel(reference)
    kw = dict(beta=0.1, pad_id=pad_id, prefix_sharing=prefix_sharing, pack_len=pack_len)
    dpo = DPO(policy, ref_model=reference, **kw)
    optimizer = torch.optim.AdamW(dpo.policy_model.parameters(), lr=1e-4, fused=True)
    if compile:
        dpo.policy_model = torch.compile(dpo.policy_model)
        dpo.ref_model = torch.compile(dpo.ref_model)

    def step(batch: dict) -> None:
        with fp32_matmuls(onednn):
            with autocast(bf16):
                loss, _ = dpo.batch_loss(batch)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def xtransformers_model(c: dict, vocab: int, seq: int) -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=vocab, max_seq_len=seq, attn_layers=Decoder(dim=c["dim"], depth=c["depth"], heads=c["heads"])
    )


def xtransformers_step(model: nn.Module, *, bf16: bool, compile: bool, pad_id: int | None) -> Callable:
    """x-transformers' own DPO step: its `DPO(model)` (reference = deep copy), AdamW."""
    from x_transformers.dpo import DPO as XDPO

    dpo = XDPO(copy.deepcopy(model), beta=0.1, pad_id=pad_id)
    optimizer = torch.optim.AdamW(dpo.parameters(), lr=1e-4)
    if compile:
        dpo.policy_model = torch.compile(dpo.policy_model)
        dpo.ref_model = torch.compile(dpo.ref_model)

    def step(batch: dict) -> None:
        prompt_mask = torch.arange(batch["chosen"].shape[1]) < batch["prompt_len"][:, None]
        with autocast(bf16):
            loss = dpo(batch["chosen"], batch["rejected"], prompt_mask=prompt_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- measuring ----------------------------------------------------------------------------------------------------


def measure_peaks(size: int, repeats: int, warmup: int) -> dict[str, float]:
    """FLOP/s of square matmuls: fp32 via torch (MKL on CPU) and via oneDNN, bf16 via torch (oneDNN)."""
    run = lambda dtype, backend: matmul_peak(dtype, size, repeats, backend=backend, warmup=warmup)["flops"]
    return {
        "fp32_torch": run(torch.float32, "torch"),
        "fp32_onednn": run(torch.float32, "onednn"),
        "bf16_torch": run(torch.bfloat16, "torch"),
    }


def peak_for(dtype: str, peaks: dict[str, float]) -> float:
    """The fastest matmul of `dtype` measured: what MFU divides by."""
    return max(v for k, v in peaks.items() if k.startswith(dtype))


def run_round_robin(entries: list[dict], *, rounds: int, peak_size: int, peak_repeats: int) -> dict:
    """Warm every entry on all its batches (pays torch.compile, every shape), then `rounds` interleaved rounds.

    Fills entry["wall"], entry["cpu"] (seconds per step, one sample per round), entry["faults"] (minor page faults
    per step); returns the peaks' samples.
    """
    for entry in entries:
        start = time.perf_counter()
        for batch in entry["batches"]:
            entry["step"](batch)
        entry["first_pass_s"] = time.perf_counter() - start
        entry["wall"], entry["cpu"], entry["faults"] = [], [], []
    peaks: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, value in measure_peaks(peak_size, peak_repeats, warmup=1).items():
            peaks.setdefault(name, []).append(value)
        for entry in entries:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in entry["batches"]:
                entry["step"](batch)
            steps = len(entry["batches"])
            entry["wall"].append((time.perf_counter() - wall) / steps)
            entry["cpu"].append((time.process_time() - cpu) / steps)
            entry["faults"].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)
    return {name: statistics.median(values) for name, values in peaks.items()} | {"samples": peaks}


def report(entries: list[dict], peaks: dict) -> list[dict]:
    rows = []
    for entry in entries:
        batches = entry["batches"]
        flops = statistics.mean(entry["flops_fn"](b) for b in batches)
        tokens = statistics.mean(pair_tokens(b) for b in batches)
        wall = statistics.median(entry["wall"])
        peak = peak_for(entry["dtype"], peaks)
        rows.append(
            dict(
                setting=entry["name"],
                dtype=entry["dtype"],
                impl=entry["impl"],
                compile=entry["compile"],
                step_s=wall,
                cpu_s=statistics.median(entry["cpu"]),
                page_faults=statistics.median(entry["faults"]),
                tokens_per_s=tokens / wall,
                gflops=flops / wall / 1e9,
                mfu=flops / wall / peak,
                peak_gflops=peak / 1e9,
                flops_per_step=flops,
                first_pass_s=entry["first_pass_s"],
                wall_samples=entry["wall"],
                cpu_samples=entry["cpu"],
            )
        )
    for row in rows:  # same round, same precision: the ratio of the two times of that round
        xt = next(r for r in rows if r["impl"] == "x-transformers" and not r["compile"] and r["dtype"] == row["dtype"])
        per_round = [x / o for x, o in zip(xt["wall_samples"], row["wall_samples"], strict=True)]
        row["vs_xt"] = statistics.median(per_round)
        row["vs_xt_cpu"] = statistics.median(xt["cpu_samples"]) / row["cpu_s"]
        xt_compiled = [r for r in rows if r["impl"] == "x-transformers" and r["compile"] and r["dtype"] == row["dtype"]]
        if xt_compiled:  # --xt-compile: compiled against compiled too
            per_round = [x / o for x, o in zip(xt_compiled[0]["wall_samples"], row["wall_samples"], strict=True)]
            row["vs_xt_compiled"] = statistics.median(per_round)
    return rows


COLUMNS = [
    ("setting", "setting", "s"),
    ("step_s", "s/step (median)", ".3f"),
    ("cpu_s", "CPU s/step", ".3f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("gflops", "GFLOP/s", ".1f"),
    ("peak_gflops", "peak GFLOP/s", ".0f"),
    ("mfu", "MFU", ".1%"),
    ("vs_xt", "vs x-transformers (wall)", ".2f"),
    ("vs_xt_cpu", "vs x-t (CPU time)", ".2f"),
    ("vs_xt_compiled", "vs x-t + compile", ".2f"),
    ("page_faults", "page faults/step", ".0f"),
    ("first_pass_s", "first pass (s)", ".1f"),
]


def workload(
    name: str, batches: list[dict], c: dict, vocab: int, seq: int, pad_id: int | None, rounds: int, args
) -> dict:
    """Every setting on `batches`, interleaved; the table and the JSON section of one workload. `pad_id`: None when
    rows have no padding (x-transformers masks every token equal to it)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, max_seq_len=seq, dim=c["dim"], depth=c["depth"], heads=c["heads"])
    ours_model = TransformerLM(config)
    xt_model = xtransformers_model(c, vocab, seq)
    last = ours_model.blocks[-1]
    ours_w = linear_weights(ours_model, ours_model.to_logits, nn.ModuleList([last.attn.to_out, last.ff]))
    xt_w = linear_weights(xt_model, xt_model.to_logits)
    flops = lambda weights, layout: (
        lambda b: step_flops(
            b, body=weights[0], head=weights[1], tail=weights[2], depth=c["depth"], dim=c["dim"], layout=layout
        )
    )
    entries = []
    for dtype in ("fp32", "bf16"):
        bf16 = dtype == "bf16"
        settings = [("ours, concatenated", "ours-concat", False, "concatenated", True)]
        settings.append(("ours", "ours", False, "packed", True))
        if not bf16 and model_lib.ONEDNN_LINEAR:
            settings.append(("ours, MKL matmuls", "ours-mkl", False, "packed", False))
        if args.compile:
            settings.append(("ours + compile", "ours", True, "packed", True))
        for label, impl, compile, layout, onednn in settings:
            kw = dict(prefix_sharing=layout == "packed", bf16=bf16, compile=compile, pad_id=pad_id or 0, onednn=onednn)
            step = our_step(ours_model, **kw)
            entries.append(dict(name=f"{dtype} {label}", impl=impl, dtype=dtype, compile=compile, step=step))
            entries[-1]["flops_fn"] = flops(ours_w, layout)
        for compile in (False, True) if args.xt_compile else (False,):
            step = xtransformers_step(xt_model, bf16=bf16, compile=compile, pad_id=pad_id)
            label = f"{dtype} x-transformers" + (" + compile" if compile else "")
            entries.append(dict(name=label, impl="x-transformers", dtype=dtype, compile=compile, step=step))
            entries[-1]["flops_fn"] = flops(xt_w, "full_logits")
    for entry in entries:
        entry["batches"] = batches
    load_before = load_average()
    print(f"\n{name}: {len(entries)} settings x {rounds} interleaved rounds (load {load_before}) ...", flush=True)
    peaks = run_round_robin(entries, rounds=rounds, peak_size=args.peak_size, peak_repeats=args.peak_repeats)
    load_after = load_average()
    rows = report(entries, peaks)
    peak_text = ", ".join(f"{k} {peaks[k] / 1e9:.0f}" for k in ("fp32_torch", "fp32_onednn", "bf16_torch"))
    print_table(
        f"{name}: median of {rounds} rounds; {CPU['model']} ({CPU['family_model']}), {torch.get_num_threads()} "
        f"threads; matmul peaks this run (GFLOP/s, {args.peak_size}^3): {peak_text}; load {load_before} -> "
        f"{load_after}",
        rows,
        COLUMNS,
    )
    return dict(rows=rows, peaks=peaks, load_before=load_before, load_after=load_after, summary=summarize(rows))


def summarize(rows: list[dict]) -> dict:
    """Per precision: ours eager and compiled vs x-transformers, MFU, and whether the targets are met."""
    out = {}
    for dtype, target in TARGETS.items():
        ours = {
            ("compile" if r["compile"] else "eager"): r for r in rows if r["impl"] == "ours" and r["dtype"] == dtype
        }
        best = max(ours.values(), key=lambda r: r["vs_xt"])
        out[dtype] = dict(
            vs_xt_eager=ours["eager"]["vs_xt"],
            vs_xt_compiled=ours["compile"]["vs_xt"] if "compile" in ours else None,
            mfu_eager=ours["eager"]["mfu"],
            mfu_compiled=ours["compile"]["mfu"] if "compile" in ours else None,
            vs_xt_cpu_eager=ours["eager"]["vs_xt_cpu"],
            vs_xt_cpu_compiled=ours["compile"]["vs_xt_cpu"] if "compile" in ours else None,
            compiled_vs_xt_compiled=ours["compile"].get("vs_xt_compiled") if "compile" in ours else None,
            best=best["setting"],
            target=target,
            meets_target=best["vs_xt"] >= target,
        )
    eager = next(r for r in rows if r["impl"] == "ours" and not r["compile"] and r["dtype"] == "fp32")
    mkl = [r for r in rows if r["impl"] == "ours-mkl"]
    if mkl:  # same round: the MKL time over the oneDNN time
        per_round = [m / o for m, o in zip(mkl[0]["wall_samples"], eager["wall_samples"], strict=True)]
        out["fp32"]["onednn_vs_mkl"] = statistics.median(per_round)
    out["bf16"]["mfu_target"] = MFU_TARGET_BF16
    out["bf16"]["meets_mfu_target"] = max(r["mfu"] for r in rows if r["impl"] == "ours" and r["dtype"] == "bf16") >= (
        MFU_TARGET_BF16
    )
    return out


# --- packing: whole pairs side by side in rows (data.packing) vs length-bucketed batches -------------------------


def tiny_hf(vocab: int, max_len: int) -> nn.Module:
    """The tiny Hugging Face model of tests/tiny_hf.py (Qwen2, 2 layers, hidden 64), over byte tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    size = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=max_len, tie_word_embeddings=True, **size)
    return Qwen2ForCausalLM(config)


def padded_fraction(batches: list[dict], **layout) -> float:
    """Padding over the positions the model runs, summed over `batches` (`ray_dpo.core.pairs.layout_tokens`: what the
    trainer logs as train/padded_fraction)."""
    counts = np.array([layout_tokens(b, **layout) for b in batches]).sum(0)
    return float(1 - counts[1] / counts[0])


def packing_workload(c: dict, args) -> dict:
    """bf16 eager DPO steps over HH-RLHF batches in bucketed order (`data.length_bucket_window`), each batch as the
    trainer runs it bucketed (padded to the batch's longest pair) and packed (`pack_len`), interleaved."""
    epoch = bucketed_batches(HH_PATH, c["batch"], c["hh_len"], c["hh_prompt"], args.bucket_window)
    spaced = np.linspace(0, len(epoch) - 1, args.packing_batches).round().astype(int)  # spread over the epoch
    batches = [epoch[i] for i in spaced]
    vocab, pad = ByteTokenizer.vocab_size, ByteTokenizer.pad_id
    torch.manual_seed(0)
    ours = TransformerLM(
        ModelConfig(vocab_size=vocab, max_seq_len=c["hh_len"], dim=c["dim"], depth=c["depth"], heads=c["heads"])
    )
    models = {"ours": ours}
    if args.hf:
        models["tiny HF Qwen2"] = tiny_hf(vocab, c["hh_len"])
    settings = []  # (model, prefix sharing, pack_len)
    for name in models:
        for prefix_sharing in (True, False) if name == "ours" and args.concatenated else (True,):
            settings += [(name, prefix_sharing, None), (name, prefix_sharing, args.pack_len)]
    entries = []
    for name, prefix_sharing, pack_len in settings:
        step = our_step(
            models[name], prefix_sharing=prefix_sharing, bf16=True, compile=False, pad_id=pad, pack_len=pack_len
        )
        label = f"{name}, {'prefix sharing' if prefix_sharing else 'concatenated'}, " + (
            f"packed ({pack_len})" if pack_len else "bucketed"
        )
        layout = dict(prefix_sharing=prefix_sharing, pack_len=pack_len)
        entries.append(dict(name=label, model=name, layout=layout, step=step, batches=batches))
    load_before = load_average()
    print(f"\npacking: {len(entries)} settings x {args.packing_rounds} interleaved rounds (load {load_before}) ...")
    peaks = run_round_robin(
        entries, rounds=args.packing_rounds, peak_size=args.peak_size, peak_repeats=args.peak_repeats
    )
    load_after = load_average()
    rows = []
    for entry in entries:
        bucketed = next(
            e for e in entries if e["model"] == entry["model"] and e["layout"] == dict(entry["layout"], pack_len=None)
        )
        per_round = [b / o for b, o in zip(bucketed["wall"], entry["wall"], strict=True)]
        wall = statistics.median(entry["wall"])
        rows.append(
            dict(
                setting=entry["name"],
                model=entry["model"],
                **entry["layout"],
                step_s=wall,
                cpu_s=statistics.median(entry["cpu"]),
                tokens_per_s=statistics.mean(pair_tokens(b) for b in batches) / wall,
                padded_fraction=padded_fraction(batches, **entry["layout"]),
                epoch_padded_fraction=padded_fraction(epoch, **entry["layout"]),
                vs_bucketed=statistics.median(per_round),
                wall_samples=entry["wall"],
            )
        )
    packed = next(r for r in rows if r["model"] == "ours" and r["prefix_sharing"] and r["pack_len"])
    summary = dict(
        packed_vs_bucketed=packed["vs_bucketed"],
        target=PACKING_TARGET,
        meets_target=packed["vs_bucketed"] >= PACKING_TARGET,
        epoch_padded_fraction=packed["epoch_padded_fraction"],
        padded_target=PADDED_TARGET,
        meets_padded_target=packed["epoch_padded_fraction"] <= PADDED_TARGET,
    )
    title = (
        f"packing: HH-RLHF, {len(batches)} of the {len(epoch)} batches of {c['batch']} pairs of an epoch in bucketed "
        f"order (window {args.bucket_window}), bf16 eager; median of {args.packing_rounds} rounds; {CPU['model']}, "
        f"{torch.get_num_threads()} threads; load {load_before} -> {load_after}"
    )
    print_table(title, rows, PACKING_COLUMNS)
    return dict(
        rows=rows,
        peaks=peaks,
        load_before=load_before,
        load_after=load_after,
        summary=summary,
        batches=len(batches),
        epoch_batches=len(epoch),
    )


PACKING_TARGET = 1.25  # packed / bucketed step time, ours, bf16 eager
PADDED_TARGET = 0.05  # padded-token fraction of an HH-RLHF epoch, packed
PACKING_COLUMNS = [
    ("setting", "setting", "s"),
    ("step_s", "s/step (median)", ".3f"),
    ("cpu_s", "CPU s/step", ".3f"),
    ("tokens_per_s", "tokens/s", ".0f"),
    ("padded_fraction", "padded (these batches)", ".1%"),
    ("epoch_padded_fraction", "padded (epoch)", ".1%"),
    ("vs_bucketed", "vs bucketed (same round)", ".2f"),
]


CPU = cpu_info()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (synthetic); medians reported")
    ap.add_argument("--hh-rounds", type=int, default=3, help="interleaved rounds over the HH-RLHF batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="time ours + compile")
    ap.add_argument("--xt-compile", action=argparse.BooleanOptionalAction, default=False, help="x-t + compile too")
    ap.add_argument("--hh-batches", type=int, default=6, help="HH-RLHF batches per round (0 = skip)")
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--peak-repeats", type=int, default=3)
    ap.add_argument("--packing-rounds", type=int, default=5, help="interleaved rounds, packed vs bucketed (0 = skip)")
    ap.add_argument("--packing-batches", type=int, default=8, help="bucketed HH-RLHF batches, spread over the epoch")
    ap.add_argument("--pack-len", type=int, default=4096, help="data.pack_len of the packed settings")
    ap.add_argument("--bucket-window", type=int, default=256, help="data.length_bucket_window (configs/hh_rlhf.yaml)")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="the tiny HF model too")
    ap.add_argument(
        "--concatenated", action=argparse.BooleanOptionalAction, default=True, help="packing: ours unshared too"
    )
    ap.add_argument("--packing-only", action="store_true", help="only the packing rows (not vs x-transformers)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round, 1 thread, no compile: a < 30 s check")
    ap.add_argument("--out", default="benchmarks/results/dpo_step.json")
    args = ap.parse_args()
    c = SMOKE if args.smoke else FULL
    if args.smoke:
        args.rounds = args.hh_rounds = args.peak_repeats = 1
        args.hh_batches, args.peak_size = min(args.hh_batches, 1), 256
        args.compile = args.xt_compile = False
        args.threads = 1  # no threads waiting on each other on a busy machine: a smoke run checks paths, not speed
        args.packing_rounds, args.packing_batches, args.pack_len = min(args.packing_rounds, 1), 1, 4 * c["hh_len"]
    env = setup(args.threads) | {"cpu_info": CPU, "reuses_freed_memory": reuse_freed_memory()}
    print(f"{CPU['model']} (family/model {CPU['family_model']}, {', '.join(CPU['features'])}), ", end="")
    print(f"{env['threads']} threads, torch {env['torch']}, load {load_average()}")

    result = dict(env=env, config=c, args=vars(args))
    if not args.packing_only:
        synth = [synthetic_batch(c["batch"], c["seq"], c["prompt"], c["vocab"])]
        title = (
            f"synthetic: dim {c['dim']} depth {c['depth']} heads {c['heads']} vocab {c['vocab']}, {c['batch']} pairs "
            f"x {c['seq']} tokens (prompt {c['prompt']})"
        )
        result["synthetic"] = workload(title, synth, c, c["vocab"], c["seq"], None, args.rounds, args)
    if args.hh_batches and not args.packing_only:
        hh = hh_batches(HH_PATH, c["batch"], args.hh_batches, max_len=c["hh_len"], max_prompt=c["hh_prompt"])
        shapes = [(int(b["prompt_len"].float().mean()), b["chosen"].shape[1]) for b in hh]
        title = (
            f"HH-RLHF: {len(hh)} batches of {c['batch']} pairs, byte tokens, prompt <= {c['hh_prompt']}, sequence <= "
            f"{c['hh_len']}; (mean prompt, width) {shapes}"
        )
        vocab, pad = ByteTokenizer.vocab_size, ByteTokenizer.pad_id
        result["hh_rlhf"] = workload(title, hh, c, vocab, c["hh_len"], pad, args.hh_rounds, args)
    for name in ("synthetic", "hh_rlhf"):
        for dtype, s in result.get(name, {}).get("summary", {}).items():
            compiled = f", compiled {s['vs_xt_compiled']:.2f}x" if s["vs_xt_compiled"] else ""
            print(
                f"{name} {dtype}: ours vs x-transformers eager {s['vs_xt_eager']:.2f}x{compiled} (target "
                f"{s['target']}x: {'met by ' + s['best'] if s['meets_target'] else 'NOT met'}); MFU eager "
                f"{s['mfu_eager']:.1%}"
                + (f", compiled {s['mfu_compiled']:.1%}" if s["mfu_compiled"] else "")
                + (f"; oneDNN fp32 matmuls vs MKL {s['onednn_vs_mkl']:.2f}x" if "onednn_vs_mkl" in s else "")
            )
    if args.packing_rounds:
        result["packing"] = packing_workload(c, args)
        s = result["packing"]["summary"]
        print(
            f"packing: ours (prefix sharing, bf16 eager) packed vs bucketed {s['packed_vs_bucketed']:.2f}x (target "
            f"{s['target']}x: {'met' if s['meets_target'] else 'NOT met'}); padded fraction of the epoch packed "
            f"{s['epoch_padded_fraction']:.1%} (target <= {s['padded_target']:.0%}: "
            f"{'met' if s['meets_padded_target'] else 'NOT met'})"
        )
    path = write_json(args.out, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
