"""Decoding throughput: ray_dpo.generate vs x-transformers' AutoregressiveWrapper.generate, same config, same run.

    python benchmarks/generate.py [--repeats 5] [--out benchmarks/results/generate.json]

New tokens per second (batch * new tokens / wall time), median over repeats; repeats of all cases are interleaved
so load from other processes on a shared machine hits every case alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from x_transformers import AutoregressiveWrapper as SeedWrapper
from x_transformers import Decoder, TransformerWrapper

from ray_dpo.generate import generate
from ray_dpo.model import ModelConfig, TransformerLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cached case")
    parser.add_argument("--uncached-repeats", type=int, default=3, help="timed runs per uncached case (slow)")
    parser.add_argument("--out", default="benchmarks/results/generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    max_len = args.prompt + args.new
    ours = TransformerLM(
        ModelConfig(vocab_size=args.vocab, max_seq_len=max_len, dim=args.dim, depth=args.depth, heads=args.heads)
    )
    seed = SeedWrapper(
        TransformerWrapper(
            num_tokens=args.vocab,
            max_seq_len=max_len,
            attn_layers=Decoder(dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True),
        )
    )
    ours.eval(), seed.eval()
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt))
    # mixed lengths (prompt/2 .. prompt): exercises the padded path (per-row positions, key-padding mask)
    mixed = [
        prompts[i, : args.prompt // 2 + i * (args.prompt // 2) // max(args.batch - 1, 1)] for i in range(args.batch)
    ]
    n = args.new

    # greedy everywhere: the same work per token for both libraries, no sampling noise in the comparison
    cases = {
        "ray_dpo cached": (lambda: generate(ours, prompts, n, temperature=0.0), "x-transformers cached"),
        "ray_dpo cached, mixed prompt lengths": (
            lambda: generate(ours, mixed, n, temperature=0.0),
            "x-transformers cached",
        ),
        "ray_dpo cached, top_p sampling": (
            lambda: generate(ours, prompts, n, filter_logits_fn="top_p", filter_kwargs=dict(thres=0.9)),
            "x-transformers cached",
        ),
        "x-transformers cached": (lambda: seed.generate(prompts, n, temperature=0.0, cache_kv=True), None),
        "ray_dpo uncached": (
            lambda: generate(ours, prompts, n, temperature=0.0, cache_kv=False),
            "x-transformers uncached",
        ),
        "x-transformers uncached": (lambda: seed.generate(prompts, n, temperature=0.0, cache_kv=False), None),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn, _ in cases.values():  # warm-up
        fn()
    for rep in range(max(args.repeats, args.uncached_repeats)):
        for name, (fn, _) in cases.items():
            if rep >= (args.uncached_repeats if "uncached" in name else args.repeats):
                continue
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            assert out.shape == (args.batch, n), (name, out.shape)

    tokens = args.batch * n
    rows = []
    for name, (_, ref) in cases.items():
        median = statistics.median(times[name])
        best = tokens / min(times[name])  # least disturbed run: a second view when the machine is shared
        rows.append(
            dict(
                case=name,
                median_s=median,
                tokens_per_s=tokens / median,
                best_tokens_per_s=best,
                runs=len(times[name]),
                reference=ref,
            )
        )
    speed = {r["case"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        r["ratio_to_x_transformers"] = speed[r["case"]] / speed[r["reference"]] if r["reference"] else 1.0

    print(
        f"batch {args.batch}, prompt {args.prompt}, {n} new tokens, dim {args.dim} depth {args.depth} "
        f"heads {args.heads} vocab {args.vocab}, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"{'case':<40} {'median s':>9} {'tokens/s':>9} {'best tok/s':>10} {'runs':>5}  vs x-transformers")
    for r in rows:
        ratio = r["ratio_to_x_transformers"]
        speeds = f"{r['tokens_per_s']:>9.0f} {r['best_tokens_per_s']:>10.0f}"
        print(f"{r['case']:<40} {r['median_s']:>9.3f} {speeds} {r['runs']:>5}  {ratio:.2f}x")

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(vars(args), torch=torch.__version__, machine=platform.machine(), processor=platform.processor())
    out_path.write_text(json.dumps(dict(config=meta, results=rows, raw_seconds=times), indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
