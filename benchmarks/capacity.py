"""Capacity plan: memory per GPU, host RAM per node and step time of a DPO job, from the model's shape (pure Python).

    python benchmarks/capacity.py                                   # the plan (Llama-3.1-8B, 1x8 and 4x8 H100)
    python benchmarks/capacity.py --write docs/SCALING.md           # the same, as the doc
    python benchmarks/capacity.py --validate benchmarks/results/scale.json   # model vs benchmarks/scale.py

A memory model, not a measurement. It counts the bytes each copy of the weights, gradients, optimizer state and
activations takes, per process, for a decoder-only causal LM given its shape (layers, hidden, intermediate, heads,
KV heads, vocabulary), the strategy (DDP + LoRA on every linear layer, FSDP2 full fine-tune over N GPUs, DDP full
fine-tune), the micro-batch, the sequence length, gradient checkpointing, chunked log-probs (`ray_dpo/logps.py`: the
head + log-softmax never hold the full (B, N, V) logits) and the reference (a live bf16 copy, sharded under FSDP; the
LoRA base with adapters off: no copy; precomputed: none).

Two loading modes:
  target   the design of docs/SCALING.md: bf16 compute; fp32 master weights and AdamW moments for a full fine-tune;
           the frozen LoRA base and the reference in bf16; meta-device init and per-rank sharded loading (a rank
           reads only its shard); the driver loads no weights; evaluation serves policy and reference from one bf16
           base (LoRA) with adapters on/off.
  today    what the code does now (read from ray_dpo/models.py, train/, evaluate.py, reference.py, serving.py, and
           checked against benchmarks/scale.py): every model load is a whole-model `from_pretrained` in fp32 on the
           CPU (also the frozen LoRA base), the reference for a full fine-tune in bf16, evaluation actors hold policy
           and reference in fp32, the driver loads the final policy in fp32 for export and again for registration.

`--validate` predicts, with the `today` mode on CPU, the growth of each process's peak from benchmarks/scale.py's
tiny model to its 0.3b one, and prints it beside the measured growth (target: within 25%).

FLOPs per optimizer step: 6 N T for the policy (forward + backward; 4 N T under LoRA, whose frozen weights need no
weight gradients; 8 N T with gradient checkpointing, one forward more), 2 N T for a live reference's forward, plus
attention (causal: 2 L h s per token forward), T = tokens run: 2 sequences per pair (chosen + rejected), the prompt
once per pair with prefix sharing. Step time = FLOPs / (GPUs x peak x MFU), at a stated MFU.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

GB = 1e9
GiB = 2**30
H100_BF16_DENSE = 989e12  # H100 SXM datasheet, dense bf16 FLOP/s
H100_MEMORY = 80e9  # H100 SXM 80GB (HBM3)
GPU_RUNTIME_OVERHEAD = 4e9  # CUDA context, NCCL buffers, allocator fragmentation: an assumption, not a measurement
RAY_OBJECT_STORE_FRACTION = 0.3  # Ray's default object store share of a node's RAM ...
RAY_OBJECT_STORE_CAP = 200e9  # ... capped at 200 GB (ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES)
NEMO_RL_GATE = dict(  # NVIDIA-NeMo/RL tests/test_suites/llm/dpo-llama3.1-8b-instruct-4n8g-fsdp2tp4.sh
    gpus=32, pairs=256, max_seq_len=8192, step_s=24.0, parallel="FSDP2 (DTensor) + tensor parallel 4, micro-batch 1"
)

Strategy = Literal["ddp_lora", "fsdp_full", "ddp_full"]
Reference = Literal["live", "adapters_off", "precomputed"]
Loading = Literal["target", "today"]


@dataclass(frozen=True)
class Shape:
    """A Llama/Qwen2/Mistral-style decoder: RMSNorm, GQA attention, SwiGLU MLP."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the 7 linear layers of one block: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def block_params(self) -> int:
        bias = self.hidden + 2 * self.kv_dim if self.qkv_bias else 0
        return sum(a * b for a, b in self.linears()) + bias + 2 * self.hidden

    @property
    def root_params(self) -> int:
        """What is not in a block: embeddings, the head (when untied), the final norm (FSDP's root unit)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.root_params

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def lora_params(self, r: int) -> int:
        """Adapters of rank r on every linear layer of every block (PEFT's all-linear: the head excluded)."""
        return self.layers * sum(r * (a + b) for a, b in self.linears())


LLAMA_31_8B = Shape("Llama-3.1-8B", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
QWEN25_7B = Shape(
    "Qwen2.5-7B", layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, qkv_bias=True
)


@dataclass(frozen=True)
class Job:
    strategy: Strategy
    gpus_per_node: int = 8
    nodes: int = 1
    pairs_per_step: int = 256
    micro_batch: int = 1  # pairs per micro-batch on one rank
    seq_len: int = 2048  # tokens of one sequence: prompt + response
    prompt_len: int = 1024  # of which prompt (matters with prefix sharing only)
    prefix_sharing: bool = False
    grad_ckpt: bool = False
    lora_r: int = 8
    reference: Reference | None = None  # default: adapters_off under LoRA, live otherwise
    loading: Loading = "target"
    chunk_size: int = 1024  # rows of logits per chunk (ray_dpo.logps.DEFAULT_CHUNK_SIZE)
    file_dtype_bytes: int = 2  # the checkpoint on disk: bf16, as Llama-3.1 and Qwen2.5 are published
    device: Literal["gpu", "cpu"] = "gpu"

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def ref(self) -> Reference:
        return self.reference or ("adapters_off" if self.strategy == "ddp_lora" else "live")

    def tokens_per_pair(self) -> int:
        """Tokens one pair runs through a model: chosen + rejected, the prompt once with prefix sharing."""
        return 2 * self.seq_len - (self.prompt_len if self.prefix_sharing else 0)


# --------------------------------------------------------------------------------------------- activations


def residual_bytes(job: Job) -> int:
    """Bytes of one residual-stream element: fp32 when the weights are fp32 under autocast (the embedding's output and
    the residual adds stay fp32), bf16 when the module's parameters are bf16 (FSDP2's param_dtype, a bf16 base)."""
    if job.strategy == "fsdp_full":
        return 2
    if job.strategy == "ddp_lora" and job.loading == "target":
        return 2
    return 4


def activation_bytes_per_token_layer(shape: Shape, job: Job) -> float:
    """What one block keeps for backward per token (Hugging Face Llama/Qwen2 under bf16 autocast, SDPA attention):
    two RMSNorms (fp32 math: input, normalised, scaled output: 3 residual-width tensors each), the bf16 casts of the
    inputs of q/k/v and of gate/up (autocast casts per op), SDPA's q, k, v and output, the o-projection's input, and
    the SwiGLU MLP's gate, up, silu(gate) and their product (the down projection's input)."""
    h, i, kv, r = shape.hidden, shape.intermediate, shape.kv_dim, residual_bytes(job)
    norms = 2 * 3 * r * h
    attention = 2 * h + (2 * h + 2 * kv + 2 * kv + 2 * h) + 2 * h  # cast input; q, k, v, out; o-proj input
    mlp = 2 * (2 * h) + 4 * (2 * i)  # casts for gate and up; gate, up, silu, product
    return norms + attention + mlp


def activations(shape: Shape, job: Job, tokens: float | None = None, *, ckpt: bool | None = None) -> float:
    """Bytes the policy's forward keeps for backward on one rank: `tokens` of a micro-batch through every block.
    Gradient checkpointing keeps each block's input only, and recomputes one block at a time in backward."""
    tokens = job.micro_batch * job.tokens_per_pair() if tokens is None else tokens
    ckpt = job.grad_ckpt if ckpt is None else ckpt
    per_layer = activation_bytes_per_token_layer(shape, job) * tokens
    if ckpt:
        return shape.layers * residual_bytes(job) * shape.hidden * tokens + per_layer
    return shape.layers * per_layer


def logits_chunk(shape: Shape, job: Job, *, trainable_head: bool) -> float:
    """The chunked head (`logps._ChunkedTargetLogps`): one (chunk, V) block of logits, bf16 out of the matmul and its
    fp32 copy; the head weight cast to the compute dtype when held in fp32; in backward, the fp32 gradient of the head
    accumulated over the chunks when the head trains."""
    chunk = job.chunk_size * shape.vocab * (2 + 4)
    fp32_head = job.strategy == "ddp_full" or (job.strategy == "ddp_lora" and job.loading == "today")
    cast = 2 * shape.head_params if fp32_head else 0
    grad = 4 * shape.head_params if trainable_head else 0
    return chunk + cast + grad


# --------------------------------------------------------------------------------------------- per GPU (per rank)


@dataclass
class Breakdown:
    parameters: float = 0.0
    weight_casts: float = 0.0  # bf16 copies of fp32 weights that autocast makes and autograd keeps for backward
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    activations_ckpt: float = 0.0
    reference: float = 0.0
    logits_chunk: float = 0.0
    fsdp_buffers: float = 0.0
    runtime: float = 0.0
    notes: list[str] = field(default_factory=list)

    def total(self, ckpt: bool) -> float:
        act = self.activations_ckpt if ckpt else self.activations
        return (
            self.parameters
            + self.weight_casts
            + self.gradients
            + self.optimizer
            + act
            + self.reference
            + self.logits_chunk
            + self.fsdp_buffers
            + self.runtime
        )


def per_gpu(shape: Shape, job: Job) -> Breakdown:
    """Steady-state training memory of one rank (the device's: GPU memory, or the process on CPU)."""
    P, W = shape.params, job.world
    b = Breakdown(runtime=GPU_RUNTIME_OVERHEAD if job.device == "gpu" else 0.0)
    b.activations = activations(shape, job, ckpt=False)
    b.activations_ckpt = activations(shape, job, ckpt=True)
    if job.strategy == "ddp_lora":
        A = shape.lora_params(job.lora_r)
        base = (2 if job.loading == "target" else 4) * P
        b.parameters = base + 4 * A
        # an fp32 base under bf16 autocast: every linear casts its weight to bf16, and autograd keeps that copy to
        # compute the input's gradient in backward: a whole bf16 copy of the model per forward with gradients
        b.weight_casts = 2 * P if job.loading == "today" else 0.0
        b.gradients = 4 * A + 4 * A  # the adapters' gradients and DDP's bucket copy of them
        b.optimizer = 8 * A
        b.logits_chunk = logits_chunk(shape, job, trainable_head=False)
        b.notes.append(f"base {'bf16' if job.loading == 'target' else 'fp32'}, {A / 1e6:.1f}M adapter parameters")
    elif job.strategy == "fsdp_full":
        b.parameters = 4 * P / W
        b.gradients = 4 * P / W
        b.optimizer = 8 * P / W
        # unsharded bf16 units: the root (embeddings + head) stays gathered through forward and backward, two blocks
        # (the running one and the prefetched one); a block's bf16 gradient and its fp32 copy for the reduce-scatter
        b.fsdp_buffers = 2 * shape.root_params + 2 * 2 * shape.block_params + (2 + 4) * shape.block_params
        b.logits_chunk = logits_chunk(shape, job, trainable_head=True)
    else:  # ddp_full
        b.parameters = 4 * P
        b.weight_casts = 2 * P  # autocast's bf16 copies of the fp32 weights, cached through the forward
        b.gradients = 4 * P + 4 * P  # gradients + DDP's bucket copy (gradient_as_bucket_view off)
        b.optimizer = 8 * P
        b.logits_chunk = logits_chunk(shape, job, trainable_head=True)
    if job.ref == "live":
        b.reference = 2 * P / (W if job.strategy == "fsdp_full" else 1)  # bf16, sharded like the policy under FSDP
    return b


# --------------------------------------------------------------------------------------------- loading and host RAM


def load_peak(shape: Shape, job: Job, dtype_bytes: int, file_bytes: int | None = None) -> float:
    """Host bytes of one whole-model `from_pretrained` on the CPU (transformers 5, safetensors). Into the file's own
    dtype the weights are views of the mapped file: nothing is read until used, then the file's pages ARE the weights
    (measured: a 1 GB fp32 checkpoint loads with +0.2 GB resident). Into another dtype (a bf16 file into fp32) every
    tensor is converted: the new weights plus the file's pages, mapped while it loads (measured: +1.66 GB for the
    0.27B model, fp32 1.07 GB + bf16 file 0.53 GB)."""
    P, file_bytes = shape.params, job.file_dtype_bytes if file_bytes is None else file_bytes
    return dtype_bytes * P if dtype_bytes == file_bytes else (dtype_bytes + file_bytes) * P


def host_per_rank(shape: Shape, job: Job) -> float:
    """Host RAM one training rank needs while it loads (then the weights move to the GPU)."""
    P, W = shape.params, job.world
    if job.loading == "today":
        policy = load_peak(shape, job, 4)  # fp32, whole model, every rank (also the frozen LoRA base)
        reference = load_peak(shape, job, 2) if job.ref == "live" else 0.0
        return max(policy, reference)  # one after the other: the policy is on the GPU before the reference loads
    if job.strategy == "fsdp_full":  # meta-device init, each rank reads its shard of the bf16 file, upcasts it
        return (job.file_dtype_bytes + 4) * P / W + 2 * shape.block_params
    return 2 * shape.block_params  # streamed tensor by tensor to the GPU (the file's pages: once per node)


def host_per_node(shape: Shape, job: Job, eval_actors_per_node: int | None = None) -> dict[str, float]:
    """Host RAM of a GPU node: the training ranks loading at once, or the evaluation actors (one per GPU) loading."""
    P, ranks = shape.params, job.gpus_per_node
    actors = job.gpus_per_node if eval_actors_per_node is None else eval_actors_per_node
    if job.loading == "today":
        train = ranks * host_per_rank(shape, job)
        evaluation = actors * load_peak(shape, job, 4)  # policy then reference, each fp32 on the CPU, then moved
    else:
        page_cache = job.file_dtype_bytes * P  # one local copy of the bf16 file per node, read by every rank
        train = page_cache + ranks * host_per_rank(shape, job)
        evaluation = page_cache + actors * 2 * shape.block_params
    return {"train": train, "eval": evaluation, "need": max(train, evaluation)}


def usable_host_ram(ram_bytes: float) -> float:
    """A node's RAM less the object store Ray reserves by default."""
    return ram_bytes - min(RAY_OBJECT_STORE_FRACTION * ram_bytes, RAY_OBJECT_STORE_CAP)


# --------------------------------------------------------------------------------------------- FLOPs and time


def step_flops(shape: Shape, job: Job, *, pairs: int | None = None, seq_len: int | None = None) -> dict[str, float]:
    """FLOPs of one optimizer step (all GPUs)."""
    pairs = job.pairs_per_step if pairs is None else pairs
    j = job if seq_len is None else replace(job, seq_len=seq_len)
    N, tokens = shape.params - shape.vocab * shape.hidden, pairs * j.tokens_per_pair()  # embedding lookups: no FLOPs
    attention_fwd = 2 * shape.layers * shape.hidden * j.seq_len  # per token, causal: mean context s / 2
    policy_mult = 4 if job.strategy == "ddp_lora" else 6  # forward + input grads (+ weight grads)
    if job.grad_ckpt:
        policy_mult += 2
    attention_mult = 3 + (1 if job.grad_ckpt else 0)
    policy = policy_mult * N * tokens + attention_mult * attention_fwd * tokens
    reference = (2 * N + attention_fwd) * tokens if job.ref != "precomputed" else 0.0
    return {"policy": policy, "reference": reference, "total": policy + reference, "tokens": tokens}


def step_time(shape: Shape, job: Job, mfu: float, peak: float = H100_BF16_DENSE, **kwargs) -> float:
    return step_flops(shape, job, **kwargs)["total"] / (job.world * peak * mfu)


# --------------------------------------------------------------------------------------------- the plan


def plan_jobs() -> list[tuple[str, Job]]:
    out = []
    for nodes in (1, 4):
        out.append((f"DDP + LoRA (r=8), {nodes}x8 H100", Job("ddp_lora", nodes=nodes)))
        out.append((f"FSDP2 full fine-tune, {nodes}x8 H100", Job("fsdp_full", nodes=nodes)))
    return out


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _para(*parts: str) -> str:
    return " ".join(parts)


MEMORY_ROWS = [
    ("parameters (policy)", "parameters"),
    ("bf16 copies of fp32 weights (autocast, kept for backward)", "weight_casts"),
    ("gradients (+ DDP bucket copy)", "gradients"),
    ("optimizer (AdamW, fp32 moments)", "optimizer"),
    ("reference", "reference"),
    ("logits chunk + head cast / head gradient", "logits_chunk"),
    ("FSDP unsharded units and buffers", "fsdp_buffers"),
    ("CUDA / NCCL / allocator (assumed)", "runtime"),
]


def _job_section(shape: Shape, title: str, job: Job, mfu: float) -> list[str]:
    tgt, today = per_gpu(shape, job), per_gpu(shape, replace(job, loading="today"))
    lines = [f"## {title}", "", "| per GPU, GB | target | target, gradient checkpointing | today's code |"]
    lines.append("|---|---|---|---|")
    for label, key in MEMORY_ROWS:
        v, t = getattr(tgt, key), getattr(today, key)
        lines.append(f"| {label} | {_gb(v)} | {_gb(v)} | {_gb(t)} |")
    lines.append(
        f"| activations (micro-batch {job.micro_batch} pair = {job.tokens_per_pair():,} tokens) | "
        f"{_gb(tgt.activations)} | {_gb(tgt.activations_ckpt)} | {_gb(today.activations)} |"
    )
    totals = (tgt.total(False), tgt.total(True), today.total(False))
    fits = ["fits" if x <= H100_MEMORY else "**does not fit**" for x in totals]
    lines.append(
        f"| **total** (of 80) | **{_gb(totals[0])}** {fits[0]} | **{_gb(totals[1])}** {fits[1]} | "
        f"**{_gb(totals[2])}** {fits[2]} |"
    )
    host, host_today = host_per_node(shape, job), host_per_node(shape, replace(job, loading="today"))
    flops, ckpt = step_flops(shape, job), replace(job, grad_ckpt=True)
    lines += [
        "",
        _para(
            f"**Host RAM per node** (loading): target {_gb(host['need'])} GB (training ranks "
            f"{_gb(host['train'])}, evaluation actors {_gb(host['eval'])}); today {_gb(host_today['need'])} GB "
            f"(each of the {job.gpus_per_node} ranks, then each evaluation actor, converts the whole model to fp32 on "
            "the CPU with the bf16 file mapped: 6 bytes per parameter).",
        ),
        "",
        _para(
            f"**Step** ({job.pairs_per_step} pairs): {flops['tokens'] / 1e6:.2f}M tokens per model, "
            f"{flops['total'] / 1e15:.0f} PFLOP (policy {flops['policy'] / 1e15:.0f}, reference "
            f"{flops['reference'] / 1e15:.0f}): **{step_time(shape, job, mfu):.1f} s at {mfu:.0%} MFU** "
            f"({step_time(shape, job, 0.3):.1f} s at 30%, {step_time(shape, job, 0.5):.1f} s at 50%); with gradient "
            f"checkpointing {step_flops(shape, ckpt)['total'] / 1e15:.0f} PFLOP, {step_time(shape, ckpt, mfu):.1f} s.",
        ),
    ]
    if tgt.notes:
        lines += ["", f"Notes: {'; '.join(tgt.notes)}."]
    return lines + [""]


def _nemo_section(shape: Shape, mfu: float) -> list[str]:
    gate = NEMO_RL_GATE
    job = Job("fsdp_full", nodes=4, seq_len=gate["max_seq_len"], prompt_len=gate["max_seq_len"] // 2)
    job2k = replace(job, seq_len=2048, prompt_len=1024)
    lines = [
        "## Beside NeMo-RL's public gate",
        "",
        _para(
            "NeMo-RL's nightly test `dpo-llama3.1-8b-instruct-4n8g-fsdp2tp4` trains Llama-3.1-8B-Instruct on",
            f"{gate['gpus']} H100 ({gate['parallel']}), {gate['pairs']} pairs per step, sequences up to",
            f"{gate['max_seq_len']:,} tokens, and requires the mean step time of steps 140-150 to be under",
            f"**{gate['step_s']:.0f} s** (`tests/test_suites/llm/dpo-llama3.1-8b-instruct-4n8g-fsdp2tp4.sh`,",
            "HelpSteer3 data). 8,192 is a cap: its pairs are mostly much shorter, and each micro-batch of one pair is",
            "padded only to its own length. Our modelled FSDP2 full fine-tune on the same 32 GPUs:",
        ),
        "",
        "| setting | tokens per model per step | per-GPU memory | PFLOP | step at 40% MFU | at 50% |",
        "|---|---|---|---|---|---|",
    ]
    for label, j in (
        ("every sequence at the 8,192 cap (an upper bound)", job),
        ("the same, gradient checkpointing", replace(job, grad_ckpt=True)),
        ("every sequence 2,048 tokens (this plan's step)", job2k),
    ):
        f, mem = step_flops(shape, j), per_gpu(shape, j).total(j.grad_ckpt)
        fits = "" if mem <= H100_MEMORY else " (does not fit)"
        lines.append(
            f"| {label} | {f['tokens'] / 1e6:.1f}M | {_gb(mem)} GB{fits} | {f['total'] / 1e15:.0f} | "
            f"{step_time(shape, j, 0.4):.1f} s | {step_time(shape, j, 0.5):.1f} s |"
        )
    ckpt = replace(job, grad_ckpt=True)
    breakeven = _breakeven_seq_len(shape, ckpt, mfu, gate["step_s"])
    lines += [
        "",
        _para(
            "At the 8,192 cap one pair's activations do not fit an 80 GB GPU without gradient checkpointing, and",
            f"with it the modelled step needs {_mfu_for(shape, ckpt, gate['step_s']):.0%} MFU to finish in 24 s;",
            f"at {mfu:.0%} MFU it does so while sequences average under ~{breakeven:,.0f} tokens. NeMo-RL's",
            "tensor parallelism (4) divides the attention and MLP activations by 4 instead, so it runs without",
            "checkpointing (and its step pays for TP's all-reduces, which this model leaves out). Whether we meet",
            "the gate on its data needs HelpSteer3's length distribution and a GPU run, neither of which this",
            "document has: a bound, not a result.",
        ),
        "",
    ]
    return lines


def predict_cpu_target(shape: Shape, config: str, workload: dict) -> dict[str, float]:
    """What the target design would use per process kind on benchmarks/scale.py's CPU workload (peak bytes)."""
    job = replace(cpu_job(config, workload), loading="target")
    P = shape.params
    out = {"driver": 0.0}  # stages files by path, loads no weights
    if job.strategy == "ddp_lora":
        out["train_worker"] = per_gpu(shape, job).total(False)  # the bf16 base is the mapped file itself
        out["eval_actor"] = 2 * P + 4 * shape.lora_params(job.lora_r)  # one bf16 base, adapters on / off
    else:  # loading (a shard of the file, upcast) is over before the optimizer state exists
        out["train_worker"] = max(per_gpu(shape, job).total(False), host_per_rank(shape, job))
        out["eval_actor"] = 2 * P + 2 * P  # policy and reference in bf16
    out["train_worker_ckpt"] = per_gpu(shape, job).total(True)
    return out


def _measured_section(data: dict) -> list[str]:
    shape_small = shape_from_scale(data["models"]["tiny"], "tiny")
    shape_big = shape_from_scale(data["models"]["0.3b"], "0.3b")
    fp32 = 4 * shape_big.params
    env, peaks = data["env"], data["matmul_peaks_flops"]
    lines = [
        "## Checked against CPU measurements (`benchmarks/scale.py`)",
        "",
        _para(
            "Measured: peak resident memory (VmHWM) of every process of `pipelines/align.py` on a random Qwen2 of",
            f"{shape_small.params / 1e6:.2f}M and one of {shape_big.params / 1e6:.0f}M parameters",
            f"({fp32 / GB:.2f} GB in fp32, saved in bf16), {data['workload']['num_workers']} CPU workers,",
            f"{data['workload']['max_steps']} steps of {data['workload']['batch_size']} pairs, validation, evaluation,",
            f"export, registration. Machine: {env['cpu']}; torch {env['torch']}; matmul peaks in the run: fp32",
            f"{peaks['fp32_torch'] / 1e9:.0f} GFLOP/s (MKL) / {peaks['fp32_onednn'] / 1e9:.0f} (oneDNN), bf16",
            f"{peaks['bf16_torch'] / 1e9:.0f}. Modelled: the same memory model as above in its `today` mode on CPU",
            "(one address space, no CUDA overhead). Growth = peak(0.27B) - peak(tiny), in units of the 0.27B",
            "model's fp32 size.",
        ),
        "",
        "| config | process | measured growth | modelled (today) | modelled / measured | target | target design "
        "(+ gradient checkpointing) |",
        "|---|---|---|---|---|---|---|",
    ]
    w = data["workload"]
    target = {}
    for config in {row["config"] for row in data["growth"]}:
        big, small = (predict_cpu_target(s, config, w) for s in (shape_big, shape_small))
        target[config] = {k: (big[k] - small[k]) / fp32 for k in big}
    for row in validate_data(data):
        config, kind = row["config"], row["kind"]
        key = "eval_actor" if kind in ("eval_actor", "reference_pass") else kind
        threshold = {"driver": "0.25"}.get(key, "")
        if config == "lora" and key in ("train_worker", "eval_actor"):
            threshold = "0.75"
        if config == "fsdp" and key == "train_worker":
            threshold = "0.6 x DDP full"
        modelled = f"{target[config][key]:.2f}"
        if key == "train_worker":
            modelled += f" ({target[config]['train_worker_ckpt']:.2f})"
            if config == "fsdp" and "ddp_full" in target:
                modelled += f"; {target[config][key] / target['ddp_full'][key]:.2f} x DDP full"
        crashed = "" if row["complete"] else " (crashed at step 1: load and sharding only)"
        lines.append(
            f"| {config} | {kind} | {row['measured_x']:.2f}{crashed} | {row['predicted_x']:.2f} | "
            f"{row['ratio']:.2f} | {threshold} | {modelled} |"
        )
    row_tokens = 2 * w["max_len"] - w["max_prompt_len"] if w["prefix_sharing"] else w["max_len"]
    micro = w["batch_size"] // w["num_workers"]
    lines += [
        "",
        _para(
            "The last column is the same model in its `target` mode: what each process would use once the loading",
            "fixes are in (no weights in the driver, bf16 frozen weights, one base for policy and reference in",
            "evaluation, FSDP sharding at load); in brackets, with gradient checkpointing. At this workload a train",
            f"worker's activations (micro-batch {micro} packed rows of up to {row_tokens} tokens through",
            f"{shape_big.layers} layers of width {shape_big.hidden}) are",
            f"~{activations(shape_big, replace(cpu_job('lora', w), loading='target')) / fp32:.2f}x of the fp32 size",
            "on their own, so the LoRA worker's 0.75x target also needs `model.gradient_checkpointing=true` (or",
            "smaller micro-batches).",
        ),
        "",
    ]
    return lines


def plan_markdown(shape: Shape = LLAMA_31_8B, mfu: float = 0.4, measured: dict | None = None) -> str:
    """docs/SCALING.md."""
    lines = [
        "# Scaling: a 7-8B model on 8+ GPUs",
        "",
        _para(
            "Generated by `python benchmarks/capacity.py --write docs/SCALING.md --measured",
            "benchmarks/results/scale.json`; edit the script, not this file. **Modelled**: every figure of the plan",
            "(bytes counted per copy of weights, gradients, optimizer state and activations; FLOPs counted per token;",
            "the MFU and the CUDA overhead assumed). **Measured**: only the CPU figures of `benchmarks/scale.py`",
            "that the model is checked against (last section). Nothing here ran on a GPU.",
        ),
        "",
        _para(
            f"Model: **{shape.name}**, {shape.params / 1e9:.2f}B parameters ({shape.layers} layers, hidden",
            f"{shape.hidden}, MLP {shape.intermediate}, {shape.heads} heads / {shape.kv_heads} KV heads, vocabulary",
            f"{shape.vocab:,}, untied head): {4 * shape.params / GB:.1f} GB in fp32, {2 * shape.params / GB:.1f} GB",
            f"in bf16. GPU: H100 SXM 80 GB, {H100_BF16_DENSE / 1e12:.0f} TFLOP/s dense bf16. Step: 256 pairs, each",
            "sequence 2,048 tokens (prompt 1,024 + response 1,024), chosen and rejected as two sequences (no prefix",
            "sharing; it would run the prompt once: 25% fewer tokens), one pair per micro-batch per GPU, gradient",
            f"accumulation up to 256 pairs. Step times at **{mfu:.0%} MFU** unless said otherwise.",
        ),
        "",
        "## Design assumed (target) and what the code does today",
        "",
        _para(
            "- **Target**: bf16 compute. A full fine-tune keeps fp32 master weights, fp32 gradients (FSDP2 reduces",
            "in fp32) and fp32 AdamW moments, all sharded over every GPU by FSDP2 (`train.strategy=fsdp`); its",
            "reference is a live bf16 copy sharded the same way. LoRA (r=8 on every linear layer) keeps the frozen",
            "base in **bf16** and uses it with adapters off as the reference (no second copy). Meta-device init and",
            "per-rank loading (an FSDP rank reads only its shard; a DDP rank streams bf16 tensors to its GPU); the",
            "driver loads no weights; evaluation actors run on GPUs, load each model once, in bf16.",
        ),
        _para(
            "- **Today** (the last column; checked on CPU below): every load is a whole-model `from_pretrained`",
            "into fp32 on the CPU of every rank (the frozen LoRA base too, so autocast also keeps a bf16 copy of it",
            "for backward), FSDP shards only after that, evaluation actors hold policy and reference in fp32, the",
            "driver loads the final policy in fp32 for export and again for registration.",
        ),
        "",
    ]
    for title, job in plan_jobs():
        lines += _job_section(shape, title, job, mfu)
    lines += _nemo_section(shape, mfu)
    lines += [
        "## Model terms",
        "",
        _para(
            "- Activations kept for backward, per token per block (Hugging Face Llama/Qwen2, bf16 autocast, SDPA):",
            "two RMSNorms at 3 residual-width tensors each (fp32 residual when the weights are fp32, bf16 when they",
            "are bf16), the bf16 inputs of q/k/v and gate/up, SDPA's q, k, v and output, the o-projection's input,",
            "and the MLP's gate, up, silu and product:",
            f"{activation_bytes_per_token_layer(shape, Job('fsdp_full')):,.0f} bytes for {shape.name} with bf16",
            "weights. Gradient checkpointing keeps each block's input and",
            "recomputes one block at a time.",
        ),
        _para(
            "- FSDP2: the root unit (embeddings + untied head, "
            f"{2 * shape.root_params / GB:.1f} GB in bf16) stays gathered through forward and backward; two blocks",
            "are gathered at a time; a block's gradient exists in bf16 and fp32 for the reduce-scatter.",
        ),
        _para(
            "- Chunked log-probs: one (1,024, V) chunk of logits in bf16 and fp32; the head cast to bf16 when held in",
            "fp32; the head's fp32 gradient accumulated over chunks when it trains.",
        ),
        _para(
            "- FLOPs: policy 6 N T (LoRA 4 N T: no weight gradients for frozen weights; +2 N T with checkpointing),",
            "reference 2 N T, attention 2 L h s per token forward (causal), N without the embedding table.",
        ),
        "",
    ]
    if measured is not None:
        lines += _measured_section(measured)
    return "\n".join(lines)


def _breakeven_seq_len(shape: Shape, job: Job, mfu: float, seconds: float) -> float:
    lo, hi = 128.0, 65536.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if step_time(shape, replace(job, seq_len=int(mid), prompt_len=int(mid) // 2), mfu) > seconds:
            hi = mid
        else:
            lo = mid
    return lo


def _mfu_for(shape: Shape, job: Job, seconds: float) -> float:
    return step_flops(shape, job)["total"] / (job.world * H100_BF16_DENSE * seconds)


# --------------------------------------------------------------------------------------------- today, on CPU


def shape_from_scale(info: dict, name: str) -> Shape:
    return Shape(
        name,
        layers=info["layers"],
        hidden=info["hidden"],
        intermediate=info["intermediate"],
        heads=info["heads"],
        kv_heads=info["kv_heads"],
        vocab=info["vocab"],
        tied=info["tied_embeddings"],
        qkv_bias=True,  # Qwen2
    )


def cpu_job(config: str, workload: dict) -> Job:
    """benchmarks/scale.py's workload as a Job on CPU (today's loading)."""
    strategy = {"lora": "ddp_lora", "fsdp": "fsdp_full", "ddp_full": "ddp_full"}[config]
    # a packed row (prefix sharing) is at most prompt + longer response (<= max_len) + shorter response
    seq = workload["max_len"]
    return Job(
        strategy=strategy,
        gpus_per_node=workload["num_workers"],
        micro_batch=workload["batch_size"] // workload["num_workers"],
        seq_len=seq,
        prompt_len=workload["max_prompt_len"],
        prefix_sharing=workload["prefix_sharing"],
        lora_r=workload["lora_r"],
        loading="today",
        device="cpu",
        file_dtype_bytes=2 if workload.get("file_dtype", "bfloat16") == "bfloat16" else 4,
    )


ALLOCATOR_RETENTION = 1 << 30  # ray_dpo.models.reuse_freed_memory: glibc keeps up to 1 GiB of freed heap memory


def predict_cpu_today(shape: Shape, config: str, workload: dict) -> dict[str, dict[str, float]]:
    """Per process kind of benchmarks/scale.py, today's code on CPU: its phases (bytes resident) and the peak, the
    largest phase. One address space holds everything a process has. The staged starting weights and the reference
    are the bf16 model directory; a DDP full fine-tune's final checkpoint is an fp32 file, a LoRA one adapters + a
    pointer to that bf16 base."""
    job = cpu_job(config, workload)
    P = shape.params
    out: dict[str, dict[str, float]] = {}
    policy_load = load_peak(shape, job, 4)  # every rank: the whole policy, bf16 file -> fp32
    if job.strategy == "fsdp_full":
        # the whole fp32 policy is loaded, then fully_shard copies each rank's shard and frees the whole copy (kept by
        # the allocator up to ALLOCATOR_RETENTION); the live reference is loaded whole (bf16: the mapped file) and
        # sharded; the run crashes in the first forward today, so the train phase is never reached
        freed = min(4 * P * (1 - 1 / job.world), ALLOCATOR_RETENTION)
        sharded = freed + 4 * P / job.world + 2 * P + 2 * P / job.world
        out["train_worker"] = {"load": policy_load, "sharded": sharded, "peak": max(policy_load, sharded)}
    else:
        train = per_gpu(shape, job).total(False)  # fp32 policy (pages touched), casts, state, activations, ref
        out["train_worker"] = {"load": policy_load, "train": train, "peak": max(policy_load, train)}
    # evaluation actors load the policy, then the reference (bf16 file -> fp32), then decode and score with both
    if config == "lora":  # the base converted to fp32 and merged (all its pages written) before the reference loads
        during_reference_load = 4 * P + load_peak(shape, job, 4)
    else:  # an fp32 checkpoint: mapped, not read yet while the reference loads
        during_reference_load = load_peak(shape, job, 4)
    running = 4 * P + 4 * P
    for kind in ("eval_actor", "reference_pass"):
        out[kind] = {"loading": during_reference_load, "running": running}
        out[kind]["peak"] = max(during_reference_load, running)
    # driver: export loads the final policy in fp32 (a LoRA base converted from bf16; an fp32 checkpoint mapped, then
    # read whole by the merge-free save), saves it; registration loads it again after the first copy is freed
    driver = load_peak(shape, job, 4, file_bytes=2 if config == "lora" else 4)
    out["driver"] = {"export": driver, "register": driver, "peak": driver}
    return out


def validate_data(data: dict) -> list[dict]:
    """Modelled (today, CPU) vs measured growth per (config, process kind) of a benchmarks/scale.py result. A crashed
    configuration is compared only for its train workers (the phases it reached); its other kinds never loaded."""
    workload = data["workload"]
    small, big = shape_from_scale(data["models"]["tiny"], "tiny"), shape_from_scale(data["models"]["0.3b"], "0.3b")
    fp32 = 4 * big.params
    rows = []
    for g in data["growth"]:
        if "growth_mb" not in g or (not g.get("complete", False) and g["kind"] != "train_worker"):
            continue
        a = predict_cpu_today(small, g["config"], workload)[g["kind"]]["peak"]
        b = predict_cpu_today(big, g["config"], workload)[g["kind"]]["peak"]
        predicted, measured = b - a, g["growth_mb"] * 2**20
        rows.append(
            dict(
                config=g["config"],
                kind=g["kind"],
                complete=g.get("complete", False),
                measured_x=measured / fp32,
                predicted_x=predicted / fp32,
                ratio=predicted / measured if measured > 0 else math.inf,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", default=None, help="write the plan (markdown) here instead of printing it")
    ap.add_argument("--measured", default=None, help="benchmarks/scale.py's JSON, for the plan's last section")
    ap.add_argument("--validate", default=None, help="benchmarks/scale.py's JSON: modelled vs measured growth")
    ap.add_argument("--mfu", type=float, default=0.4)
    args = ap.parse_args()
    if args.validate:
        rows = validate_data(json.loads(Path(args.validate).read_text()))
        print("| config | process | measured growth / fp32 | modelled (today) | modelled / measured | within 25% |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            ok = "yes" if 0.75 <= r["ratio"] <= 1.25 else "NO"
            if not r["complete"]:
                ok += " (crashed run: the phases it reached)"
            print(
                f"| {r['config']} | {r['kind']} | {r['measured_x']:.2f} | {r['predicted_x']:.2f} | {r['ratio']:.2f} "
                f"| {ok} |"
            )
        return
    measured = json.loads(Path(args.measured).read_text()) if args.measured else None
    text = plan_markdown(mfu=args.mfu, measured=measured)
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text)


if __name__ == "__main__":
    main()
