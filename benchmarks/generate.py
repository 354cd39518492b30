"""Decoding throughput: ray_dpo.core.sampling vs x-transformers' AutoregressiveWrapper.generate, same config, same run.

    python benchmarks/generate.py [--batches 1 8 64] [--repeats 5] [--compile] [--uncached-batch 8]
    python benchmarks/generate.py --smoke [--out path.json]   # tiny model, seconds: CI runs it so it cannot rot

New tokens per second (batch * new tokens / wall time of one `generate` call, prefill included), median over
repeats. All cases of all batch sizes are interleaved within each repeat, so load from other processes on a
shared machine hits every case alike; `ratio` is x-transformers' median time / ours, `paired` the median of the
per-repeat ratios (each from two back-to-back runs: the steadier figure on a noisy machine). Greedy everywhere:
the same work per token for both libraries, no sampling noise in the comparison (except the top_p case).

--compile adds `decode="compile"` (torch.compile of the single-token step); its first call, which compiles, is
timed separately and reported as `compile_s`. On a 2-core EPYC it did not pay: each call was slower than eager
(no oneDNN-prepacked weights, attention over the whole cache), besides 3-27 s of compiling per shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from x_transformers import AutoregressiveWrapper as SeedWrapper
from x_transformers import Decoder, TransformerWrapper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, print_table, setup, write_json  # noqa: E402

from ray_dpo.core.model import ModelConfig, TransformerLM  # noqa: E402
from ray_dpo.core.sampling import generate  # noqa: E402

SMOKE = dict(batches=[1, 4], prompt=8, new=8, dim=32, depth=1, heads=2, vocab=64, repeats=2, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case first")
    parser.add_argument("--compile", action="store_true", help='add decode="compile" cases (compiles once per batch)')
    parser.add_argument("--uncached-batch", type=int, default=0, help="add uncached cases at this batch size")
    parser.add_argument("--uncached-repeats", type=int, default=3, help="timed runs per uncached case (slow)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few tokens: seconds, still writes the JSON")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate[_smoke].json)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    out_path = args.out or f"benchmarks/results/generate{'_smoke' if args.smoke else ''}.json"
    env = setup(args.threads)
    env["cpu"] = cpu_model()
    load_before = os.getloadavg()

    max_len = args.prompt + args.new
    config = ModelConfig(vocab_size=args.vocab, max_seq_len=max_len, dim=args.dim, depth=args.depth, heads=args.heads)
    ours = TransformerLM(config).eval()
    seed = SeedWrapper(
        TransformerWrapper(
            num_tokens=args.vocab,
            max_seq_len=max_len,
            attn_layers=Decoder(dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True),
        )
    ).eval()
    n = args.new

    # (batch, case) -> (fn, the x-transformers case it is compared with)
    cases: dict[tuple[int, str], tuple[Callable[[], torch.Tensor], str | None]] = {}
    for b in args.batches:
        prompts = torch.randint(0, args.vocab, (b, args.prompt))
        # mixed lengths (prompt/2 .. prompt): the padded path (per-row positions, key-padding mask)
        mixed = [prompts[i, : args.prompt // 2 + i * (args.prompt // 2) // max(b - 1, 1)] for i in range(b)]
        xt = "x-transformers cached"
        cases[b, "ray_dpo cached"] = (lambda p=prompts: generate(ours, p, n, temperature=0.0), xt)
        if args.compile:
            cases[b, "ray_dpo cached, compiled step"] = (
                lambda p=prompts: generate(ours, p, n, temperature=0.0, decode="compile"),
                xt,
            )
        if b > 1:
            cases[b, "ray_dpo cached, mixed prompt lengths"] = (
                lambda p=mixed: generate(ours, p, n, temperature=0.0),
                xt,
            )
        cases[b, "ray_dpo cached, top_p sampling"] = (
            lambda p=prompts: generate(ours, p, n, filter_logits_fn="top_p", filter_kwargs=dict(thres=0.9)),
            xt,
        )
        cases[b, xt] = (lambda p=prompts: seed.generate(p, n, temperature=0.0, cache_kv=True), None)
        if b == args.uncached_batch:
            cases[b, "ray_dpo uncached"] = (
                lambda p=prompts: generate(ours, p, n, temperature=0.0, cache_kv=False),
                "x-transformers uncached",
            )
            cases[b, "x-transformers uncached"] = (
                lambda p=prompts: seed.generate(p, n, temperature=0.0, cache_kv=False),
                None,
            )

    compile_s: dict[int, float] = {}
    for (b, name), (fn, _) in cases.items():
        for i in range(args.warmup):
            start = time.perf_counter()
            fn()
            if i == 0 and "compiled" in name:
                compile_s[b] = time.perf_counter() - start

    times: dict[tuple[int, str], list[float]] = {key: [] for key in cases}
    for rep in range(max(args.repeats, args.uncached_repeats if args.uncached_batch else 0)):
        for key, (fn, _) in cases.items():
            if rep >= (args.uncached_repeats if "uncached" in key[1] else args.repeats):
                continue
            start = time.perf_counter()
            out = fn()
            times[key].append(time.perf_counter() - start)
            assert out.shape == (key[0], n), (key, out.shape)

    rows = []
    for (b, name), (_, ref) in cases.items():
        t = times[b, name]
        median = statistics.median(t)
        row = dict(batch=b, case=name, median_s=median, tokens_per_s=b * n / median, best_tokens_per_s=b * n / min(t))
        row.update(runs=len(t), reference=ref, ratio=None, paired_ratio=None)
        if ref is not None:
            ref_t = times[b, ref]
            row["ratio"] = statistics.median(ref_t) / median
            row["paired_ratio"] = statistics.median(r / o for r, o in zip(ref_t, t, strict=False))
        if b in compile_s and "compiled" in name:
            row["compile_s"] = compile_s[b]
        rows.append(row)

    print(
        f"prompt {args.prompt}, {n} new tokens, dim {args.dim} depth {args.depth} heads {args.heads} vocab "
        f"{args.vocab}; {env['threads']} threads, torch {env['torch']}; CPU: {env['cpu']}; load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    columns = [
        ("batch", "batch", "d"),
        ("case", "case", "s"),
        ("median_s", "median s", ".3f"),
        ("tokens_per_s", "tokens/s", ",.0f"),
        ("best_tokens_per_s", "best tokens/s", ",.0f"),
        ("runs", "runs", "d"),
        ("ratio", "vs x-transformers", ".2f"),
        ("paired_ratio", "paired", ".2f"),
    ]
    if compile_s:
        columns.append(("compile_s", "compile s", ".1f"))
    print_table(f"generate, {env['cpu']}", rows, columns)
    meta = dict(vars(args), out=out_path, **env, load_average_before=load_before, load_average_after=os.getloadavg())
    raw = {f"batch {b}: {name}": t for (b, name), t in times.items()}
    print(f"\nwrote {write_json(out_path, dict(config=meta, results=rows, raw_seconds=raw))}")


if __name__ == "__main__":
    main()
