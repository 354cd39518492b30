"""DPO training-step benchmark (issues 2 and 8): step time, tokens/s and MFU, ours vs x-transformers' `DPO`.

    python benchmarks/dpo_step.py [--steps 10] [--no-compile] [--out benchmarks/results/dpo_step.json]

One step = policy forward + backward on the chosen and rejected sequences, a live-reference forward on the same,
the loss, and an AdamW step. Numbers are medians of repeats on a shared, noisy machine.

FLOPs are counted analytically (PaLM appendix B) and as executed: 2 x (matmul weights, output projection included)
per token fed to a model, pads included, + 4 x depth x dim per (query, key) pair attention computes (no causal
discount, as PaLM / nanoGPT). Concatenated: 2B rows of N - 1 tokens, (N - 1)^2 pairs each. Prefix sharing
(`dpo.pack_pairs`): B rows of split + W tokens, split^2 + W (P + W) pairs each, where split = max(p + longer
response), W = max(shorter response), P = max(p). A DPO step runs the policy forward + backward (3 x forward) and
the live reference forward (1 x). MFU = those FLOPs / step time / this run's measured matmul FLOP/s in the same
dtype (bf16 autocast rows against the bf16 peak).

tokens/s counts the pair's real tokens, prompt counted in both sequences and no pads: sum(2 p + c + r) per step.
Every row of a table has the same numerator, so the ratio of tokens/s is the speedup.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak, print_table, setup, summarize, write_json  # noqa: E402

from ray_dpo.dpo import DPO, pack_pairs  # noqa: E402
from ray_dpo.model import ModelConfig, TransformerLM  # noqa: E402
from ray_dpo.tokenizer import ByteTokenizer  # noqa: E402

HH_PATH = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf" / "hh_rlhf_harmless_train_1812.parquet"


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


def hh_batches(path: Path, batch: int, n_batches: int, max_len: int, max_prompt: int, seed: int = 0) -> list[dict]:
    """HH-RLHF-shaped batches: byte tokens, prompt left-truncated to `max_prompt`, responses cut at `max_len`."""
    table = pq.read_table(path, columns=["prompt", "chosen", "rejected"])
    tok = ByteTokenizer()
    order = np.random.default_rng(seed).permutation(table.num_rows)[: batch * n_batches]
    cols = {name: tok.encode_batch([table.column(name)[int(i)].as_py() for i in order]) for name in table.column_names}
    prompts = [x[-max_prompt:] for x in cols["prompt"]]  # keep the end: the last turn and "Assistant:"
    chosens = [x[: max_len - len(q)] for q, x in zip(prompts, cols["chosen"], strict=True)]
    rejecteds = [x[: max_len - len(q)] for q, x in zip(prompts, cols["rejected"], strict=True)]
    sl = lambda xs, k: xs[k * batch : (k + 1) * batch]
    return [collate(sl(prompts, k), sl(chosens, k), sl(rejecteds, k), tok.pad_id) for k in range(n_batches)]


def pair_tokens(batch: dict) -> int:
    return int((2 * batch["prompt_len"] + batch["chosen_len"] + batch["rejected_len"]).sum())


# --- FLOPs --------------------------------------------------------------------------------------------------------


def linear_flops_per_token(model: nn.Module, depth: int, dim: int, seq_len: int) -> float:
    """Forward FLOPs/token from the model's actual nn.Linear weights (tied weights once) + attention."""
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    return 2 * sum(weights.values()) + 4 * depth * seq_len * dim


def dpo_step_flops(fwd_per_token, batch: dict, prefix_sharing: bool) -> float:
    """Executed FLOPs of one step: (policy 3x + reference 1x) forward over what the models are fed.

    `fwd_per_token(keys)` is the forward FLOPs of a token attending to `keys` keys: its value at 0 is the matmul
    weights' part, and each key adds fwd_per_token(1) - fwd_per_token(0).
    """
    per_token, per_pair = fwd_per_token(0), fwd_per_token(1) - fwd_per_token(0)
    rows = batch["chosen"].shape[0]
    if prefix_sharing:  # the layout dpo.pack_pairs builds
        lengths = (batch[k] for k in ("prompt_len", "chosen_len", "rejected_len"))
        packed = pack_pairs(batch["chosen"], batch["rejected"], *lengths)
        split, prompt = packed.attn_mask.split, packed.attn_mask.prompt_keys
        width = packed.tokens.shape[1] - split
        tokens, pairs = rows * (split + width), rows * (split**2 + width * (prompt + width))
    else:
        n = batch["chosen"].shape[1] - 1
        tokens, pairs = 2 * rows * n, 2 * rows * n**2
    return 4 * (tokens * per_token + pairs * per_pair)


# --- steps --------------------------------------------------------------------------------------------------------


def our_step(model: TransformerLM, *, prefix_sharing: bool, bf16: bool, fused: bool, compile: bool, pad_id: int):
    dpo = DPO(copy.deepcopy(model), beta=0.1, pad_id=pad_id, prefix_sharing=prefix_sharing)
    optimizer = torch.optim.AdamW(dpo.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    if compile:
        dpo.policy_model = torch.compile(dpo.policy_model)
        dpo.ref_model = torch.compile(dpo.ref_model)
    device_type = next(model.parameters()).device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(batch: dict) -> None:
        with autocast():  # fp32 master weights; matmuls in bf16
            loss, _ = dpo.batch_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def xtransformers_step(vocab: int, seq: int, dim: int, depth: int, heads: int):
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.dpo import DPO as XDPO

    model = TransformerWrapper(
        num_tokens=vocab, max_seq_len=seq, attn_layers=Decoder(dim=dim, depth=depth, heads=heads)
    )
    dpo = XDPO(model, beta=0.1)
    optimizer = torch.optim.AdamW(dpo.parameters(), lr=1e-4)

    def step(batch: dict) -> None:
        prompt_mask = torch.arange(batch["chosen"].shape[1]) < batch["prompt_len"][:, None]
        dpo(batch["chosen"], batch["rejected"], prompt_mask=prompt_mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def measure_round_robin(entries: list[dict], *, warmup: int, repeats: int, peaks: dict) -> None:
    """Time every entry's step once per round, rounds interleaved with the matmul peaks.

    Other jobs share the 2 cores: interleaving spreads their load evenly over the settings (and the peak),
    so ratios stay fair even when absolute times drift. Fills entry["timing"] (seconds per step) and peaks.
    """
    for entry in entries:
        start = time.perf_counter()
        entry["step"](entry["batches"][0])  # pays for torch.compile, if any
        entry["first_call_s"] = time.perf_counter() - start
        for _ in range(warmup):
            entry["step"](entry["batches"][0])
    samples = {id(e): [] for e in entries}
    peak_samples = {name: [] for name in peaks}
    for _ in range(repeats):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peak_samples[name].append(matmul_peak(dtype, repeats=3)["flops"])
        for entry in entries:
            start = time.perf_counter()
            for batch in entry["batches"]:
                entry["step"](batch)
            samples[id(entry)].append((time.perf_counter() - start) / len(entry["batches"]))
    for entry in entries:
        entry["timing"] = summarize(samples[id(entry)]) | {"first_call_s": entry["first_call_s"]}
    for name, values in peak_samples.items():
        peaks[name] = {"flops": statistics.median(values), "flops_samples": values, "size": 2048}


def report_row(entry: dict, peaks: dict) -> dict:
    stats, batches = entry["timing"], entry["batches"]
    flops = sum(dpo_step_flops(entry["flops_fn"], b, entry["prefix_sharing"]) for b in batches) / len(batches)
    tokens = sum(pair_tokens(b) for b in batches) / len(batches)
    achieved = flops / stats["median_s"]
    return dict(
        setting=entry["name"],
        dtype=entry["dtype"],
        prefix_sharing=entry["prefix_sharing"],
        fused_adamw=entry["fused"],
        compile=entry["compile"],
        step_s=stats["median_s"],
        tokens_per_s=tokens / stats["median_s"],
        gflops=achieved / 1e9,
        mfu=achieved / peaks[entry["dtype"]]["flops"],
        flops_per_step=flops,
        timing=stats,
    )


# --- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (synthetic); median reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time torch.compile")
    ap.add_argument("--xt", action=argparse.BooleanOptionalAction, default=True, help="time x-transformers' DPO")
    ap.add_argument("--hh-batches", type=int, default=6, help="HH-RLHF batches per timed pass (0 = skip)")
    ap.add_argument("--hh-passes", type=int, default=5, help="timed passes over the HH batches; median reported")
    ap.add_argument("--out", default="benchmarks/results/dpo_step.json")
    args = ap.parse_args()
    env = setup(args.threads)
    dim, depth, heads, vocab, batch, seq, prompt = 256, 4, 4, 256, 8, 256, 64
    print(f"threads={env['threads']} torch={env['torch']}")

    model = TransformerLM(ModelConfig(vocab_size=vocab, max_seq_len=2 * seq, dim=dim, depth=depth, heads=heads))
    fpt = lambda n: model.flops_per_token(n, training=False)
    # flops_per_token must agree with the FLOPs of the Linear layers actually in the model
    assert abs(fpt(255) - linear_flops_per_token(model, depth, dim, 255)) < 1, "flops_per_token disagrees"
    synth = [synthetic_batch(batch, seq, prompt, vocab)]

    def ours(name, batches, flops_fn, *, prefix_sharing, bf16, fused=False, compile=False, pad_id=0, base=model):
        step = our_step(base, prefix_sharing=prefix_sharing, bf16=bf16, fused=fused, compile=compile, pad_id=pad_id)
        return dict(
            name=name,
            step=step,
            batches=batches,
            flops_fn=flops_fn,
            prefix_sharing=prefix_sharing,
            dtype="bf16" if bf16 else "fp32",
            fused=fused,
            compile=compile,
        )

    entries = [
        ours("ours fp32, concatenated (plain)", synth, fpt, prefix_sharing=False, bf16=False),
        ours("ours fp32, prefix sharing", synth, fpt, prefix_sharing=True, bf16=False),
        ours("ours bf16 autocast, concatenated", synth, fpt, prefix_sharing=False, bf16=True),
        ours("ours bf16 autocast, prefix sharing", synth, fpt, prefix_sharing=True, bf16=True),
        ours("ours bf16 autocast, prefix sharing, fused AdamW", synth, fpt, prefix_sharing=True, bf16=True, fused=True),
    ]
    if args.compile:  # compiling costs a minute on 2 shared cores: only the bf16 settings (the fastest eager ones)
        for prefix in (False, True):
            name = f"ours bf16 autocast, {'prefix sharing' if prefix else 'concatenated'}, fused AdamW, torch.compile"
            entries.append(ours(name, synth, fpt, prefix_sharing=prefix, bf16=True, fused=True, compile=True))
    if args.xt:
        step, xt_model = xtransformers_step(vocab, seq, dim, depth, heads)
        # x-transformers runs chosen and rejected as separate forwards: counted like our concatenated path
        xt_fpt = lambda n: linear_flops_per_token(xt_model, depth, dim, n)
        entries.append(
            dict(
                name="x-transformers DPO fp32 (reference)",
                step=step,
                batches=synth,
                flops_fn=xt_fpt,
                prefix_sharing=False,
                dtype="fp32",
                fused=False,
                compile=False,
            )
        )

    print(f"synthetic: {len(entries)} settings, {args.steps} interleaved rounds ...", flush=True)
    peaks: dict = {"fp32": None, "bf16": None}
    measure_round_robin(entries, warmup=args.warmup, repeats=args.steps, peaks=peaks)
    for name, peak in peaks.items():
        print(f"matmul peak {name}: {peak['flops'] / 1e9:.1f} GFLOP/s (2048^3, median over rounds)")
    rows = [report_row(e, peaks) | {"first_call_s": e["first_call_s"]} for e in entries]
    plain = rows[0]["step_s"]
    xt = next((r for r in rows if r["setting"].startswith("x-transformers")), None)
    for r in rows:
        r["speedup_vs_plain_fp32"] = plain / r["step_s"]
        r["speedup_vs_xtransformers"] = xt["step_s"] / r["step_s"] if xt else None
    best = min((r for r in rows if r["setting"].startswith("ours")), key=lambda r: r["step_s"])
    columns = [
        ("setting", "setting", "s"),
        ("step_s", "median step (s)", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("gflops", "GFLOP/s", ".1f"),
        ("mfu", "MFU", ".1%"),
        ("speedup_vs_plain_fp32", "vs plain fp32", ".2f"),
        ("speedup_vs_xtransformers", "vs x-transformers", ".2f"),
    ]
    title = "DPO step, dim 256 depth 4 heads 4 vocab 256, batch 8, seq 256 (prompt 64)"
    print_table(f"{title}: median of {args.steps} interleaved rounds, {env['threads']} threads", rows, columns)
    print(f"\nbest: {best['setting']}: {best['step_s']:.3f} s/step")

    hh_rows = []
    if args.hh_batches:
        hh = hh_batches(HH_PATH, batch, args.hh_batches, max_len=512, max_prompt=384)
        shapes = [(int(b["prompt_len"].float().mean()), b["chosen"].shape[1]) for b in hh]
        print(f"\nHH-RLHF: {len(hh)} batches of {batch}; (mean prompt, padded width) per batch: {shapes}", flush=True)
        hh_model = TransformerLM(
            ModelConfig(vocab_size=ByteTokenizer.vocab_size, max_seq_len=512, dim=dim, depth=depth, heads=heads)
        )
        hh_fpt = lambda n: hh_model.flops_per_token(n, training=False)
        hh_entries = []
        for bf16 in (False, True):
            for prefix in (False, True):
                name = f"{'bf16 autocast' if bf16 else 'fp32'}, {'prefix sharing' if prefix else 'concatenated'}"
                hh_entries.append(
                    ours(
                        name,
                        hh,
                        hh_fpt,
                        prefix_sharing=prefix,
                        bf16=bf16,
                        fused=best["fused_adamw"],
                        pad_id=ByteTokenizer.pad_id,
                        base=hh_model,
                    )
                )
        hh_peaks: dict = {"fp32": None, "bf16": None}
        measure_round_robin(hh_entries, warmup=0, repeats=args.hh_passes, peaks=hh_peaks)
        hh_rows = [report_row(e, hh_peaks) for e in hh_entries]
        for concat, shared in zip(hh_rows[::2], hh_rows[1::2], strict=True):
            shared["prefix_speedup"] = shared["tokens_per_s"] / concat["tokens_per_s"]
        columns = [c for c in columns if c[0] not in ("speedup_vs_plain_fp32", "speedup_vs_xtransformers")]
        columns.append(("prefix_speedup", "prefix / concat tokens/s", ".2f"))
        title = f"DPO step, HH-RLHF batches of {batch} (byte tokens, prompt <= 384, sequence <= 512)"
        print_table(f"{title}: median of {args.hh_passes} interleaved passes over {len(hh)} batches", hh_rows, columns)

    for r in rows:
        r.pop("step", None)
    path = write_json(
        args.out,
        dict(
            env=env,
            peaks=peaks,
            synthetic=rows,
            hh_rlhf=hh_rows,
            config=dict(dim=dim, depth=depth, heads=heads, vocab=vocab, batch=batch, seq=seq, prompt=prompt),
            note="medians of interleaved repeats on a shared, noisy 2-core machine",
        ),
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
