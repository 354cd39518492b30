"""Peak memory of one DPO step at a 128k vocabulary: full (B, N, V) logits vs chunked log-probs.

    python benchmarks/memory.py [--models ours llama] [--smoke] [--out benchmarks/results/memory.json]

One step = policy forward on chosen + rejected (concatenated: 2 x pairs rows of N - 1 tokens), a reference forward
under no_grad, the sigmoid DPO loss, backward and an AdamW step. Both variants run the same code except for the
log-probs: `token_logps(model(tokens), targets)` ("plain", what `DPO` does today) or `logps.scored_logps` ("chunked":
head + log-softmax only on scored response tokens, `--chunk-size` rows at a time).

Every (model, variant) runs in a FRESH subprocess, so one's allocations cannot hide in another's high-water mark.
CPU (no torch peak-allocation counter): peak RSS growth = ru_maxrss after the step - ru_maxrss after setup (models,
reference copy, optimizer, batch). It includes what the first step allocates for good - gradients and AdamW's two
moments, 3 x the parameters, the same for both variants (the `state MB` column). CUDA: max_memory_allocated during
the step - memory_allocated after setup. s/step: a second, warm step in the same process (one sample: indicative;
--smoke times the first step only).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, print_table, setup, write_json  # noqa: E402

from ray_dpo.core.dpo import token_logps
from ray_dpo.core.logps import scored_logps, scoring_path  # noqa: E402
from ray_dpo.core.losses import LossSpec, PairLogps, preference_loss  # noqa: E402
from ray_dpo.core.model import ModelConfig, TransformerLM  # noqa: E402
from ray_dpo.core.pairs import reduce_logps

FULL = dict(vocab=128_256, seq=1024, pairs=2, prompt=256, dim=256, depth=2, heads=4)  # Llama 3's vocabulary
SMOKE = dict(vocab=8192, seq=128, pairs=2, prompt=32, dim=64, depth=1, heads=2)


def build_model(kind: str, size: dict) -> nn.Module:
    if kind == "ours":  # tied embeddings, as the training config
        config = ModelConfig(
            vocab_size=size["vocab"], max_seq_len=size["seq"], dim=size["dim"], depth=size["depth"], heads=size["heads"]
        )
        return TransformerLM(config)
    from transformers import LlamaConfig, LlamaForCausalLM  # random init from a config: nothing downloaded

    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["dim"],
        intermediate_size=2 * size["dim"],
        num_hidden_layers=size["depth"],
        num_attention_heads=size["heads"],
        num_key_value_heads=max(1, size["heads"] // 2),
        max_position_embeddings=size["seq"],
        tie_word_embeddings=False,  # Llama 3 8B: a separate lm_head
    )
    return LlamaForCausalLM(config)


def pairs_batch(size: dict, device: torch.device) -> tuple[Tensor, Tensor]:
    """(2 x pairs, seq) rows, chosen then rejected, sharing a prompt; the scored-target mask (targets = seq[:, 1:])."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randint(0, size["vocab"], (2, size["pairs"], size["seq"]), generator=g)
    rejected[:, : size["prompt"]] = chosen[:, : size["prompt"]]
    seqs = torch.cat((chosen, rejected)).to(device)
    scored = torch.zeros_like(seqs, dtype=torch.bool)
    scored[:, size["prompt"] :] = True
    return seqs, scored[:, 1:]


def dpo_step(policy, reference, optimizer, seqs, scored, *, variant: str, chunk_size: int, bf16: bool) -> float:
    """One DPO step as `DPO.loss_and_metrics` runs it: policy first, then the reference while the policy graph lives."""
    tokens, targets = seqs[:, :-1], seqs[:, 1:]

    def logps(model: nn.Module) -> Tensor:
        if variant == "plain":
            output = model(tokens)
            return token_logps(getattr(output, "logits", output), targets)
        return scored_logps(model, tokens, targets, scored, chunk_size=chunk_size)

    autocast = torch.autocast(seqs.device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        policy_logps = reduce_logps(logps(policy), scored)
        with torch.no_grad():
            ref_logps = reduce_logps(logps(reference), scored)
        half = seqs.shape[0] // 2
        counts = scored.sum(-1)
        pairs = [(x[:half], x[half:]) for x in (policy_logps, counts, ref_logps)]
        loss = preference_loss(LossSpec(beta=0.1), PairLogps(*(t for pair in pairs for t in pair))).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(spec: dict) -> dict:
    """Measure one (model, variant) in this process; runs in a fresh interpreter."""
    env = setup(spec["threads"]) | dict(cpu=cpu_model())
    device = torch.device(spec["device"])
    size = spec["size"]
    policy = build_model(spec["model"], size).to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    seqs, scored = pairs_batch(size, device)
    kwargs = dict(variant=spec["variant"], chunk_size=spec["chunk_size"], bf16=spec["bf16"])
    params = sum(p.numel() * p.element_size() for p in policy.parameters())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = max_rss_bytes()
    start = time.perf_counter()
    dpo_step(policy, reference, optimizer, seqs, scored, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else max_rss_bytes()) - base
    start = time.perf_counter()
    if spec["warm_step"]:
        dpo_step(policy, reference, optimizer, seqs, scored, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    return dict(
        model=spec["model"],
        variant=spec["variant"],
        path=scoring_path(policy) if spec["variant"] == "chunked" else "full_logits",
        peak_mb=peak / 2**20,
        state_mb=3 * params / 2**20,  # gradients + AdamW exp_avg, exp_avg_sq: allocated by the first step
        logits_mb=seqs.shape[0] * (seqs.shape[1] - 1) * size["vocab"] * 4 / 2**20,  # one fp32 (B, N, V) tensor
        step_s=time.perf_counter() - start if spec["warm_step"] else first_s,
        first_step_s=first_s,
        measure="cuda max_memory_allocated" if cuda else "ru_maxrss growth",
        load_avg_1min=os.getloadavg()[0],  # other jobs on a shared machine: s/step is only as good as this is low
        env=env,
    )


def run_child(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{spec['model']}/{spec['variant']} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    has_hf = importlib.util.find_spec("transformers") is not None  # not a dependency of ray-dpo: llama only if there
    ap.add_argument("--models", nargs="+", choices=("ours", "llama"), default=["ours", "llama"] if has_hf else ["ours"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (< 20 s), for CI: checks it runs, not the target")
    ap.add_argument("--chunk-size", type=int, default=1024, help="rows of logits per chunk (logps.target_logps)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast with fp32 master weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory[_smoke].json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    size = SMOKE if args.smoke else FULL
    torch.set_num_threads(args.threads)
    cpu = cpu_model()
    print(f"device={args.device} cpu={cpu} torch={torch.__version__} size={size} chunk_size={args.chunk_size}")
    rows = []
    for model in args.models:
        for variant in ("plain", "chunked"):
            spec = dict(model=model, variant=variant, size=size, device=args.device, threads=args.threads)
            spec |= dict(chunk_size=args.chunk_size, bf16=args.bf16, warm_step=not args.smoke)
            rows.append(run_child(spec))
            print(f"  {model}/{variant}: {rows[-1]['peak_mb']:.0f} MB, {rows[-1]['step_s']:.2f} s/step", flush=True)
    for row in rows:
        plain = next(r for r in rows if r["model"] == row["model"] and r["variant"] == "plain")
        row["ratio"] = row["peak_mb"] / plain["peak_mb"]
        row["setting"] = f"{row['model']} {row['variant']} ({row['path']})"
    title = (
        f"Peak memory of one DPO step ({rows[0]['measure']}), vocab {size['vocab']}, seq {size['seq']}, "
        f"{size['pairs']} pairs (prompt {size['prompt']}), dim {size['dim']} depth {size['depth']}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, chunk {args.chunk_size}; {args.device}: {cpu}"
    )
    columns = [
        ("setting", "variant", "s"),
        ("peak_mb", "peak MB", ".0f"),
        ("ratio", "vs plain", ".2f"),
        ("step_s", "s/step", ".2f"),
        ("state_mb", "state MB (grads + AdamW, in peak)", ".0f"),
        ("logits_mb", "one fp32 logits tensor MB", ".0f"),
        ("load_avg_1min", "load avg", ".1f"),
    ]
    print_table(title, rows, columns)
    if not args.smoke:
        for row in rows[1::2]:
            verdict = "met" if row["ratio"] <= 1 / 3 else "NOT met"
            print(f"{row['model']}: chunked / plain = {row['ratio']:.2f} (target <= 0.33: {verdict})")
    out = args.out or f"benchmarks/results/memory{'_smoke' if args.smoke else ''}.json"
    payload = dict(
        cpu=cpu,
        device=args.device,
        size=size,
        chunk_size=args.chunk_size,
        bf16=args.bf16,
        rows=rows,
        note="each row a fresh subprocess; one step measured, one warm step timed, on a shared machine",
    )
    print(f"\nwrote {write_json(out, payload)}")


if __name__ == "__main__":
    main()
