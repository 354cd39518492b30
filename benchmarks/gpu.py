"""One accelerator, torch only: a Llama-shaped Hugging Face model of ~0.5B parameters, DPO step and decoding.

    python benchmarks/gpu.py                                   # CUDA, preset 0.5b, 8 pairs x 1024 tokens
    python benchmarks/gpu.py --device cpu --preset tiny        # CPU dry run (< 30 s)
    python benchmarks/gpu.py --smoke --out /tmp/gpu.json       # the same dry run, what tests/test_benchmarks.py runs
    python benchmarks/gpu.py --train-smoke                     # + pipelines/align.py on the GPU(s), tiny config

The model is `transformers.LlamaForCausalLM` built from a `LlamaConfig` (random init, nothing downloaded). A DPO step
is the trainer's: `DPO(policy, ref_model=reference)`, `DPO.batch_loss` under bf16 autocast (fp32 master weights), a
frozen bf16 reference, backward, fused AdamW. Three settings:

- "plain": full logits, `token_logps(model(tokens).logits, targets)` on every position (the model wrapped so that
  `ray_dpo.core.logps` takes its full-logits path), chosen and rejected as 2B rows;
- "chunked": `LogpsModel` (the head only on scored tokens, `chunk_size` rows at a time), 2B rows;
- "chunked + prefix sharing": the same with `prefix_sharing=True` (one packed row per pair, a 4-D mask).

Packing rows (`data.packing`): pairs of varied lengths (prompt seq/8..seq/2, responses 8..the rest of seq), each
DPO step padded to the batch's longest pair (prefix sharing, what a bucketed batch runs) against the same pairs packed
into rows of up to 4 x seq tokens: the Hugging Face Llama with its 4-D mask (SDPA), and our TransformerLM of the same
width and depth with the dense mask (SDPA) and with FlexAttention's block mask (`attention.PACKED_CUDA_ATTENTION`:
set the faster; FlexAttention only on CUDA).

Pairs share a prompt of `--prompt` tokens; both responses fill the row (`--seq`). Reported per setting: median s/step,
tokens/s (sum of 2 p + c + r per step), executed TFLOP/s and MFU against the bf16 matmul peak measured in this run
(and the datasheet's dense bf16 peak where the device is known), peak memory (CUDA max_memory_allocated during the
timed steps). FLOPs are counted as in benchmarks/dpo_step.py. Decoding: `model.generate` (KV cache, greedy, bf16) of
`--new-tokens` after a 128-token prompt, batch `--batch`, tokens/s.

`--train-smoke` runs `pipelines/align.py --config configs/tiny.yaml train.use_gpu=true` with one Ray Train worker
per visible GPU (at most 2; one GPU each), bf16, prefix sharing; it reports the exit status and the wall time.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak, print_table, summarize, time_fn, write_json  # noqa: E402
from dpo_step import linear_weights, pair_tokens, step_flops, synthetic_batch  # noqa: E402

import ray_dpo.core.attention as attention  # noqa: E402
from ray_dpo.core.dpo import DPO  # noqa: E402
from ray_dpo.core.logps import LogpsModel  # noqa: E402
from ray_dpo.core.model import ModelConfig, TransformerLM  # noqa: E402
from ray_dpo.core.pairs import layout_tokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = {  # Llama shapes: ~0.49B parameters (untied 32k vocabulary), and a CPU-sized one for dry runs
    "0.5b": dict(
        hidden_size=1280,
        num_hidden_layers=24,
        num_attention_heads=20,
        num_key_value_heads=4,
        intermediate_size=3456,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
}
DATASHEET_BF16_DENSE = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # SXM, FLOP/s without sparsity


class FullLogits(nn.Module):
    """`model(tokens).logits`: a module `core.logps` does not recognise, so it runs the plain full-logits path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits


def build_llama(preset: str, max_len: int, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=max_len, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device)


def dpo_step(policy: nn.Module, reference: nn.Module, kind: str):
    """The trainer's step for one setting: fp32 master weights + bf16 autocast, frozen bf16 reference."""
    wrap = FullLogits if kind == "plain" else LogpsModel
    model = copy.deepcopy(policy)
    dpo = DPO(wrap(model), ref_model=wrap(reference), prefix_sharing=kind == "chunked + prefix sharing")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    device_type = next(model.parameters()).device.type

    def step(batch: dict) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss, _ = dpo.batch_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, (model, optimizer)


def varied_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Pairs of varied lengths sharing their prompts, right-padded to the longest (the training batch contract)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(seq // 8, seq // 2 + 1, (batch,), generator=g)
    c, r = (torch.stack([torch.randint(8, seq - int(x) + 1, (1,), generator=g)[0] for x in p]) for _ in range(2))
    n = int((p + torch.maximum(c, r)).max())
    j = torch.arange(n)
    chosen, rejected = (torch.randint(0, vocab, (batch, n), generator=g) for _ in range(2))
    rejected = torch.where(j < p[:, None], chosen, rejected)
    chosen, rejected = chosen.masked_fill(j >= (p + c)[:, None], 0), rejected.masked_fill(j >= (p + r)[:, None], 0)
    return dict(chosen=chosen, rejected=rejected, prompt_len=p, chosen_len=c, rejected_len=r)


def packing_rows(policy: nn.Module, batch: dict, steps: int, device: torch.device) -> list[dict]:
    """Padded vs packed DPO steps (prefix sharing, bf16 autocast, frozen bf16 reference) on varied-length pairs: the
    Hugging Face Llama (4-D mask) and our TransformerLM of its shape (dense mask; FlexAttention on CUDA)."""
    c = policy.config
    torch.manual_seed(0)
    ours = TransformerLM(
        ModelConfig(
            vocab_size=c.vocab_size,
            max_seq_len=4 * batch["chosen"].shape[1],
            dim=c.hidden_size,
            depth=c.num_hidden_layers,
            heads=c.num_attention_heads,
        )
    ).to(device)
    pack_len = 4 * batch["chosen"].shape[1]
    settings = [("HF Llama", policy, None, "sdpa"), ("HF Llama", policy, pack_len, "sdpa")]
    settings += [("ours", ours, None, "sdpa"), ("ours", ours, pack_len, "sdpa")]
    if device.type == "cuda":
        settings.append(("ours", ours, pack_len, "flex"))
    rows = []
    for name, model, packed, kernel in settings:
        reference = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
        trained = copy.deepcopy(model)
        wrap = LogpsModel if name != "ours" else (lambda m: m)
        dpo = DPO(wrap(trained), ref_model=wrap(reference), prefix_sharing=True, pack_len=packed)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5, fused=True)

        def step(dpo=dpo, optimizer=optimizer) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _ = dpo.batch_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        shipped, attention.PACKED_CUDA_ATTENTION = attention.PACKED_CUDA_ATTENTION, kernel
        try:
            stats = summarize(time_fn(step, warmup=2, repeats=steps))
        finally:
            attention.PACKED_CUDA_ATTENTION = shipped
        positions, pair_tokens = layout_tokens(batch, prefix_sharing=True, pack_len=packed)
        kernels = {"flex": "FlexAttention", "sdpa": "SDPA" if device.type == "cuda" else "CPU tiles"}
        layout = "padded" if not packed else f"packed rows, {'4-D mask' if name != 'ours' else kernels[kernel]}"
        rows.append(
            dict(
                setting=f"{name}, {layout}",
                step_s=stats["median_s"],
                tokens_per_s=pair_tokens / stats["median_s"],
                padded_fraction=1 - pair_tokens / positions,
                timing=stats,
            )
        )
        del dpo, optimizer, trained, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        padded = next(r for r in rows if r["setting"].split(",")[0] == row["setting"].split(",")[0])
        row["vs_padded"] = padded["step_s"] / row["step_s"]
    return rows


def train_smoke(use_gpu: bool) -> dict:
    """pipelines/align.py end to end on the tiny config: one worker per GPU (<= 2), bf16, prefix sharing."""
    workers = max(1, min(2, torch.cuda.device_count())) if use_gpu else 2
    out = tempfile.mkdtemp(prefix="gpu-smoke-")
    cmd = [
        sys.executable,
        str(REPO / "pipelines" / "align.py"),
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"output_dir={out}",
        f"train.storage_path={out}/ray",
        f"train.use_gpu={'true' if use_gpu else 'false'}",
        f"train.num_workers={workers}",
        "train.precision=bf16",
        "dpo.prefix_sharing=true",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    result = dict(cmd=" ".join(cmd), returncode=proc.returncode, wall_s=time.perf_counter() - start, workers=workers)
    print(f"\ntrain smoke ({workers} worker(s), use_gpu={use_gpu}): exit {proc.returncode} in {result['wall_s']:.0f} s")
    if proc.returncode:
        result["tail"] = (proc.stdout + proc.stderr)[-3000:]
        print(result["tail"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: 0.5b on CUDA, tiny on CPU")
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (default 8; 2 for tiny)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per chosen / rejected row (default 1024; 64 tiny)")
    ap.add_argument("--prompt", type=int, default=None, help="shared prompt tokens (default seq / 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 10; 2 tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoding: new tokens (default 128; 8 tiny)")
    ap.add_argument("--train-smoke", action="store_true", help="also run pipelines/align.py on the GPU(s)")
    ap.add_argument("--smoke", action="store_true", help="= --device cpu --preset tiny: seconds, checks the paths")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.preset = "cpu", "tiny"
    device = torch.device(args.device)
    tiny = (args.preset or ("0.5b" if device.type == "cuda" else "tiny")) == "tiny"
    preset = "tiny" if tiny else (args.preset or "0.5b")
    batch_size = args.batch or (2 if tiny else 8)
    seq = args.seq or (64 if tiny else 1024)
    prompt = args.prompt or seq // 4
    steps = args.steps or (2 if tiny else 10)
    new_tokens = args.new_tokens or (8 if tiny else 128)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:  # a dry run checks the paths: one thread does not wait on another on a busy machine
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    policy = build_llama(preset, seq + 128 + new_tokens, device)
    reference = copy.deepcopy(policy).to(torch.bfloat16).eval().requires_grad_(False)  # as the trainer holds it
    params = sum(p.numel() for p in policy.parameters())
    print(f"{name}: Llama {preset} ({params / 1e6:.1f}M params), {batch_size} pairs x {seq} tokens (prompt {prompt})")
    peak = matmul_peak(torch.bfloat16, size=8192 if device.type == "cuda" else 512, device=device)["flops"]
    datasheet = next((v for k, v in DATASHEET_BF16_DENSE.items() if k in name), None)
    batch = {k: v.to(device) for k, v in synthetic_batch(batch_size, seq, prompt, policy.config.vocab_size).items()}
    body, head, _ = linear_weights(policy, policy.lm_head)
    c = policy.config
    rows = []
    for kind in ("plain", "chunked", "chunked + prefix sharing"):
        step, state = dpo_step(policy, reference, kind)
        start = time.perf_counter()
        step(batch)
        sync()
        first = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        stats = summarize(time_fn(lambda step=step: step(batch), warmup=1, repeats=steps))
        layout = {"plain": "full_logits", "chunked": "concatenated"}.get(kind, "packed")
        flops = step_flops(
            batch, body=body, head=head, tail=0, depth=c.num_hidden_layers, dim=c.hidden_size, layout=layout
        )
        achieved = flops / stats["median_s"]
        rows.append(
            dict(
                setting=kind,
                step_s=stats["median_s"],
                tokens_per_s=pair_tokens(batch) / stats["median_s"],
                tflops=achieved / 1e12,
                mfu=achieved / peak,
                mfu_datasheet=achieved / datasheet if datasheet else None,
                peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 1e9) if device.type == "cuda" else None,
                step_mem_gb=((torch.cuda.max_memory_allocated(device) - base) / 1e9) if device.type == "cuda" else None,
                first_step_s=first,
                flops_per_step=flops,
                timing=stats,
            )
        )
        del step, state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["speedup_vs_plain"] = rows[0]["step_s"] / row["step_s"]
    columns = [
        ("setting", "DPO step", "s"),
        ("step_s", "median (s)", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("tflops", "TFLOP/s", ".2f"),
        ("mfu", "MFU (measured peak)", ".1%"),
        ("mfu_datasheet", "MFU (datasheet)", ".1%"),
        ("peak_mem_gb", "peak mem (GB)", ".1f"),
        ("speedup_vs_plain", "vs plain", ".2f"),
    ]
    sheet = f"; datasheet {datasheet / 1e12:.0f}" if datasheet else ""
    print(f"bf16 matmul peak measured: {peak / 1e12:.2f} TFLOP/s{sheet}")
    print_table(f"DPO step on {name}, Llama {preset}, {batch_size} pairs x {seq}, median of {steps}", rows, columns)

    varied = {k: v.to(device) for k, v in varied_batch(batch_size, seq, c.vocab_size).items()}
    packing = packing_rows(policy, varied, steps, device)
    packing_columns = [
        ("setting", "DPO step, varied lengths, prefix sharing", "s"),
        ("step_s", "median (s)", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("padded_fraction", "padded", ".1%"),
        ("vs_padded", "vs padded", ".2f"),
    ]
    print_table(
        f"Packing on {name}: {batch_size} pairs of up to {seq} tokens, median of {steps}", packing, packing_columns
    )

    prompts = torch.randint(0, c.vocab_size, (batch_size, 128 if not tiny else 16), device=device)
    gen_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    generate = lambda: reference.generate(prompts, attention_mask=torch.ones_like(prompts), **gen_kwargs)
    gen_stats = summarize(time_fn(generate, warmup=1, repeats=3))
    gen = dict(
        tokens_per_s=batch_size * new_tokens / gen_stats["median_s"],
        batch=batch_size,
        prompt=prompts.shape[1],
        new_tokens=new_tokens,
        timing=gen_stats,
    )
    print(f"\ndecoding (HF generate, KV cache, greedy, bf16), batch {batch_size}: {gen['tokens_per_s']:,.0f} tokens/s")
    result = dict(
        device=name,
        preset=preset,
        params=params,
        config=PRESETS[preset] | dict(batch=batch_size, seq=seq, prompt=prompt, steps=steps),
        peak_bf16=peak,
        datasheet_bf16=datasheet,
        dpo_step=rows,
        packing=packing,
        generation=gen,
        torch=torch.__version__,
    )
    if args.train_smoke:
        result["train_smoke"] = train_smoke(use_gpu=device.type == "cuda")
    path = write_json(args.out, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
