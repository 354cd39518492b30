"""Attention kernels on this CPU: PyTorch SDPA vs the tiled matmul path `ray_dpo.core.attention.attend` takes for bf16.

    python benchmarks/attention.py [--repeats 15] [--out benchmarks/results/attention.json]
    python benchmarks/attention.py --smoke --out /tmp/attention.json   # short rows, 1 repeat: seconds, for tests

Causal self-attention, forward + backward, 4 heads of 64, batch chosen so every shape holds ~4k query tokens
(the DPO benchmark's 2 x 8 rows of 255). "untiled": `matmul_attention` (two matmuls and a softmax over all
(N, N) scores); "tiled": `tiled_attention` over `causal_tiles` (query tiles that skip the keys the causal mask
hides), both forced for every dtype and length; "attend": what the model runs. Where `attend` switches to SDPA
(MATMUL_ATTENTION_MAX_KEYS) should sit below the key length at which the tiled path stops winning in bf16. Medians
of interleaved repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, setup, write_json  # noqa: E402

from ray_dpo.core.attention import MATMUL_ATTENTION_MAX_KEYS, attend, matmul_attention  # noqa: E402
from ray_dpo.core.kernels import causal_tiles, tiled_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="two short key lengths, 1 repeat, 1 thread: checks it runs")
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args()
    key_lengths, query_tokens = (256, 512, 768, 1024, 1536, 2048), 4096
    if args.smoke:
        key_lengths, query_tokens, args.repeats, args.threads = (64, 128), 256, 1, 1
    env = setup(args.threads)
    kernels = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "untiled": lambda q, k, v: matmul_attention(q, k, v, None, True, 0.0),  # forced, for every dtype and length
        "tiled": lambda q, k, v: tiled_attention(q, k, v, causal_tiles(q.shape[-2], q.dtype, q.device)),
        "attend": lambda q, k, v: attend(q, k, v, None, True, 0.0),  # what the model runs
    }
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for keys in key_lengths:
            batch = max(1, query_tokens // keys)
            q, k, v = (torch.randn(batch, 4, keys, 64, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn_like(q)
            step = lambda kernel, q=q, k=k, v=v, grad=grad: kernel(q, k, v).backward(grad)
            samples = {name: [] for name in kernels}
            for kernel in kernels.values():
                step(kernel)  # warm-up
            for _ in range(args.repeats):  # interleaved, so the machine's noise hits every kernel alike
                for name, kernel in kernels.items():
                    start = time.perf_counter()
                    step(kernel)
                    samples[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
            rows.append(
                dict(
                    dtype=str(dtype).removeprefix("torch."),
                    keys=keys,
                    batch=batch,
                    sdpa_ms=ms["sdpa"],
                    untiled_ms=ms["untiled"],
                    tiled_ms=ms["tiled"],
                    attend_ms=ms["attend"],
                    tiled_speedup=ms["sdpa"] / ms["tiled"],
                )
            )
    columns = [
        ("dtype", "dtype", "s"),
        ("keys", "keys", "d"),
        ("batch", "batch", "d"),
        ("sdpa_ms", "SDPA fwd+bwd (ms)", ".1f"),
        ("untiled_ms", "untiled matmuls (ms)", ".1f"),
        ("tiled_ms", "tiled (ms)", ".1f"),
        ("attend_ms", "attend (ms)", ".1f"),
        ("tiled_speedup", "SDPA / tiled", ".2f"),
    ]
    title = f"causal attention fwd+bwd, 4 heads x 64, ~{query_tokens} query tokens, {env['threads']} threads"
    print_table(
        f"{title}: median of {args.repeats}; attend switches to SDPA above {MATMUL_ATTENTION_MAX_KEYS} keys",
        rows,
        columns,
    )
    path = write_json(args.out, dict(env=env, smoke=args.smoke, max_keys=MATMUL_ATTENTION_MAX_KEYS, rows=rows))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
