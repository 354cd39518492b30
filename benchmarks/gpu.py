"""Torch-only DPO step and generation on one accelerator: a GPT-2-small-sized model (124M), bf16, MFU.

    python benchmarks/gpu.py [--device cuda] [--preset 124m] [--batch 8] [--seq 1024] [--compile]
    python benchmarks/gpu.py --device cpu --preset tiny --steps 2      # smoke run on a laptop

No Ray: this times the torch core alone (what a lent GPU is for). A step is the DPO train step of
benchmarks/dpo_step.py (policy forward + backward, live reference forward, fused AdamW) under bf16 autocast, with
causal SDPA (the flash kernel on CUDA), concatenated and with prefix sharing (prompt = seq / 4). MFU = executed
FLOPs (counted as in dpo_step.py) / step time / the bf16 matmul FLOP/s measured in the same run; the datasheet's
dense bf16 peak is used too where the device is known.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak, print_table, summarize, time_fn, write_json  # noqa: E402
from dpo_step import dpo_step_flops, our_step, pair_tokens, synthetic_batch  # noqa: E402

from ray_dpo.generate import generate  # noqa: E402
from ray_dpo.model import ModelConfig, TransformerLM  # noqa: E402

PRESETS = {  # GPT-2 small's shape (vocab padded to a multiple of 64), and a CPU-sized one for smoke runs
    "124m": dict(vocab_size=50304, dim=768, depth=12, heads=12),
    "tiny": dict(vocab_size=256, dim=256, depth=4, heads=4),
}
DATASHEET_BF16_DENSE = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # SXM, FLOP/s without sparsity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="124m")
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per chosen / rejected row")
    ap.add_argument("--steps", type=int, default=10, help="timed steps; median reported")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="also time torch.compile")
    ap.add_argument("--new-tokens", type=int, default=128, help="generation: new tokens after a 32-token prompt")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    config = ModelConfig(max_seq_len=args.seq, **PRESETS[args.preset])
    model = TransformerLM(config).to(device)
    print(f"{name}: {args.preset} ({model.num_params() / 1e6:.1f}M params), batch {args.batch} pairs x {args.seq}")

    peak = matmul_peak(torch.bfloat16, size=8192 if device.type == "cuda" else 2048, device=device)["flops"]
    datasheet = next((v for k, v in DATASHEET_BF16_DENSE.items() if k in name), None)
    batch = {
        k: v.to(device) for k, v in synthetic_batch(args.batch, args.seq, args.seq // 4, config.vocab_size).items()
    }
    fwd_per_token = lambda keys: model.flops_per_token(keys, training=False)
    rows = []
    for prefix_sharing in (False, True):
        for compile in (False, True) if args.compile else (False,):
            step = our_step(model, prefix_sharing=prefix_sharing, bf16=True, fused=True, compile=compile, pad_id=0)
            start = time.perf_counter()
            step(batch)
            first_call = time.perf_counter() - start
            stats = summarize(time_fn(lambda step=step: step(batch), warmup=2, repeats=args.steps))
            achieved = dpo_step_flops(fwd_per_token, batch, prefix_sharing) / stats["median_s"]
            rows.append(
                dict(
                    setting=f"bf16, {'prefix sharing' if prefix_sharing else 'concatenated'}"
                    + (", torch.compile" if compile else ""),
                    step_s=stats["median_s"],
                    tokens_per_s=pair_tokens(batch) / stats["median_s"],
                    tflops=achieved / 1e12,
                    mfu=achieved / peak,
                    mfu_datasheet=achieved / datasheet if datasheet else None,
                    first_call_s=first_call,
                    timing=stats,
                )
            )
    columns = [
        ("setting", "DPO step", "s"),
        ("step_s", "median (s)", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("tflops", "TFLOP/s", ".2f"),
        ("mfu", "MFU (measured peak)", ".1%"),
        ("mfu_datasheet", "MFU (datasheet)", ".1%"),
    ]
    print(
        f"bf16 matmul peak measured: {peak / 1e12:.1f} TFLOP/s"
        + (f"; datasheet {datasheet / 1e12:.0f}" if datasheet else "")
    )
    print_table(
        f"DPO step on {name}, {args.preset}, {args.batch} pairs x {args.seq}, median of {args.steps}", rows, columns
    )

    model.eval()
    prompts = torch.randint(0, config.vocab_size, (args.batch, 32), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        times = time_fn(lambda: generate(model, prompts, args.new_tokens, temperature=0.0), warmup=1, repeats=3)
    gen = dict(tokens_per_s=args.batch * args.new_tokens / summarize(times)["median_s"], timing=summarize(times))
    print(
        f"\ngeneration, bf16, batch {args.batch}, prompt 32, {args.new_tokens} new tokens, cached: "
        f"{gen['tokens_per_s']:,.0f} tokens/s"
    )
    path = write_json(
        args.out,
        dict(
            device=name,
            preset=args.preset,
            config=vars(config),
            peak_bf16=peak,
            datasheet_bf16=datasheet,
            dpo_step=rows,
            generation=gen,
            torch=torch.__version__,
        ),
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
