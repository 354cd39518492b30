"""Memory that scales: the real align pipeline on a tiny and a ~0.3B Hugging Face model, peak memory per process.

    python benchmarks/scale.py                      # tiny + 0.3b, three configurations each (~15-25 min here)
    python benchmarks/scale.py --smoke --out /tmp/scale.json       # tiny only, LoRA only (what a test runs)
    python benchmarks/scale.py --sizes 0.3b --configs lora          # one cell

What can't run on this machine (a 7-8B model on 8+ GPUs) is shown by how memory grows from a tiny model to a ~0.3B
one on 2 CPU workers: a process that holds one more copy of the weights than it must grows by one more fp32 (or
bf16) model size. Each cell runs `pipelines/align.py --config configs/hf_tiny.yaml` as a subprocess (its own local
Ray), with overrides for 2 optimizer steps on 2 workers, validation, evaluation (a few prompts), export and MLflow
registration, in one of three configurations:

  lora       DDP + LoRA (model.lora_r=8; the reference is the base with adapters off)
  lora_ckpt  the same with gradient checkpointing (model.gradient_checkpointing=true), as a 7-8B LoRA run is set up
  fsdp       FSDP2 full fine-tune (train.strategy=fsdp model.lora_r=0; a live bf16 reference)
  ddp_full   DDP full fine-tune (model.lora_r=0): the baseline the FSDP target compares with

The models are random Qwen2s built from a config and saved in bf16 (as Llama-3.1 and Qwen2.5 are published), with a
byte-level BPE tokenizer trained with `tokenizers` on the repository's HH-RLHF text and a ChatML template: nothing
is downloaded. The 0.3b shape (hidden 1024, 24 layers, MLP 2816, 16 heads, 2 KV heads) is ~0.27B parameters,
1.1 GB in fp32: an extra copy of the weights shows plainly in a process's peak.

Peak memory is VmHWM of /proc/<pid>/status (the high-water mark of resident memory), polled while each process
lives: the driver (the align.py subprocess) and every Ray process descended from it, told apart by their titles:
`ray::RayTrainWorker` (train workers), `...PolicyReferenceEvaluator` (evaluation: generation from policy and
reference, and held-out pair scoring), `...PairScorer` (the reference pass, when it runs), `ray::_publish` and
`ray::_load_and_stage` (the tasks that export, register and stage weights: the driver loads none). A process's
kind is the model-work title it ever had (Ray starts actors in pooled worker processes).

Reported per (configuration, process kind): the peak at each size, the fp32 size of the 0.3b model, and the growth
from tiny to 0.3b as a fraction of that size, against the targets: driver <= 0.25x; LoRA train worker and
evaluation actor <= 0.75x; FSDP full fine-tune worker <= 0.6x of a DDP full fine-tune worker's growth. A cell that
fails is reported as "crashed: <last error line>" and the others still run. `benchmarks/capacity.py --validate
<json>` compares these figures with its memory model.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2Config

from common import cpu_info, cpu_model, load_average, matmul_peak, print_table, setup, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALIGN = REPO / "pipelines" / "align.py"
BASE_CONFIG = REPO / "configs" / "hf_tiny.yaml"
TRAIN_DATA = REPO / "data" / "hh_rlhf" / "hh_rlhf_harmless_train_1812.parquet"
VAL_DATA = REPO / "data" / "hh_rlhf" / "hh_rlhf_harmless_test_500.parquet"

SHAPES = {  # Qwen2 shapes; the vocabulary is the trained tokenizer's
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "0.3b": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=2
    ),
}
VOCAB = 2048
CONFIGS = {
    "lora": ["model.lora_r=8"],
    # what a 7-8B LoRA run uses (docs/SCALING.md): activations recomputed in backward
    "lora_ckpt": ["model.lora_r=8", "model.gradient_checkpointing=true"],
    "fsdp": ["train.strategy=fsdp", "model.lora_r=0", "train.lr=1e-5"],
    "ddp_full": ["model.lora_r=0", "train.lr=1e-5"],
}
# the workload of every cell: small enough that the 0.3b cells take minutes on 2 busy cores, so the weights (not the
# activations) dominate the growth; the capacity model reads these from the JSON
WORKLOAD = dict(
    train_rows=64,
    val_rows=16,
    num_workers=2,
    batch_size=4,
    max_steps=2,
    max_len=128,
    max_prompt_len=64,
    eval_prompts=4,
    eval_new_tokens=8,
    eval_kl_samples=1,
    eval_batch_size=4,
    prefix_sharing=True,
    precision="bf16",
    lora_r=8,
    file_dtype="bfloat16",
)
TARGETS = {"driver": 0.25, "lora_train_worker": 0.75, "eval_actor": 0.75, "fsdp_over_ddp_full": 0.6}
# ray.init gives the local raylet a fixed 30 s to register: on a machine loaded by others it sometimes does not
RAY_STARTUP_FLAKE = "timed out during startup"
KINDS = ("driver", "train_worker", "eval_actor", "reference_pass", "weights_task")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------------ models and data


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen2's special tokens and a ChatML chat template (no bos; eos ends a turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def qwen2_config(size: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,  # as Qwen2.5's small models
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[size],
    )


def model_facts(config: Qwen2Config) -> dict:
    """Parameter count (tied embeddings once) and shape, from a meta-device model: no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    return dict(
        params=params,
        fp32_bytes=4 * params,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        vocab=config.vocab_size,
        tied_embeddings=bool(config.tie_word_embeddings),
    )


def build_model(size: str, tokenizer: PreTrainedTokenizerFast, out_dir: Path, seed: int = 0) -> dict:
    """A random Qwen2 of `size` saved in bf16 with its tokenizer (a Hugging Face model directory)."""
    from transformers import AutoModelForCausalLM

    config = qwen2_config(size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    gc.collect()
    return model_facts(config) | dict(path=str(out_dir))


def write_data(work: Path) -> dict[str, str]:
    """The first rows of the repository's HH-RLHF train and test files: enough for 2 steps, validation and eval."""
    import pyarrow.parquet as pq

    out = {}
    for name, source, rows in (("train", TRAIN_DATA, WORKLOAD["train_rows"]), ("val", VAL_DATA, WORKLOAD["val_rows"])):
        path = work / "data" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(source).slice(0, rows), path)
        out[name] = str(path)
    return out


# ------------------------------------------------------------------------------------------------ memory polling


def _ppid(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # after "(comm) S": ppid


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _status_kb(pid: int, *keys: str) -> dict[str, int]:
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return found


def kind_of(title: str) -> str | None:
    """The model-work kind of a Ray process title, None for the rest."""
    if title.startswith("ray::RayTrainWorker"):
        return "train_worker"
    if "PolicyReferenceEvaluator" in title:
        return "eval_actor"
    if "PairScorer" in title:
        return "reference_pass"
    if title.startswith(("ray::_publish", "ray::_load_and_stage")):
        return "weights_task"
    return None


class Poller(threading.Thread):
    """VmHWM of a process and of every process descended from it, every `interval` s while they live. Ray's workers
    descend from the driver that started the local Ray (raylet's children), so other users' Ray processes on a
    shared machine are never counted."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.procs: dict[int, dict] = {}
        self.done = threading.Event()

    def descendants(self) -> set[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                parent = _ppid(entry)
                if parent is not None:
                    children.setdefault(parent, []).append(int(entry))
        found, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    def sample(self, pids: set[int] | None = None) -> set[int]:
        """Read the peaks of `pids` (default: a fresh scan of the tree); returns the pids still alive."""
        alive = set(self.descendants() if pids is None else pids)
        for pid in list(alive):
            status = _status_kb(pid, "VmHWM", "VmRSS")
            if "VmHWM" not in status:  # gone (or a kernel thread)
                alive.discard(pid)
                continue
            proc = self.procs.setdefault(pid, {"pid": pid, "kind": None, "titles": [], "hwm_kb": 0})
            title = _title(pid)
            short = title.split(" ")[0][:120]
            if short and short not in proc["titles"]:
                proc["titles"].append(short)
            if pid == self.root:
                proc["kind"] = "driver"
            elif proc["kind"] is None:
                proc["kind"] = kind_of(title)
            proc["hwm_kb"] = max(proc["hwm_kb"], status["VmHWM"])
        return alive

    def run(self) -> None:
        # a full /proc scan finds new processes once a second; the known ones are read every `interval` (cheap on a
        # busy 2-core machine)
        known: set[int] = set()
        last_scan = 0.0
        while not self.done.is_set():
            if time.monotonic() - last_scan >= 1.0:
                known, last_scan = self.sample(), time.monotonic()
            else:
                known = self.sample(known)
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join()


# ------------------------------------------------------------------------------------------------ one cell


def last_error_line(text: str) -> str:
    """The line that says why a run failed: the last one naming an error, else the last non-empty one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:)", line) and not line.startswith("File "):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _stop_tree(poller: Poller, grace_s: float = 60.0) -> None:
    """Wait for what the run started to exit; then end what is left (only our own descendants, by pid)."""
    deadline = time.monotonic() + grace_s
    left = poller.descendants() - {poller.root}
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = {pid for pid in left if Path(f"/proc/{pid}").exists()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
        left = {pid for pid in left if Path(f"/proc/{pid}").exists()}


def run_cell(size: str, config: str, model_dir: str, data: dict[str, str], work: Path, timeout_s: float) -> dict:
    """`pipelines/align.py` on `model_dir` in `config`, its processes' peaks polled; the cell's result row."""
    cell = work / "runs" / f"{size}-{config}"
    w = WORKLOAD
    overrides = [
        f"model.hf_path={model_dir}",
        f"output_dir={cell / 'out'}",
        f"train.storage_path={cell / 'ray'}",
        f"train.run_name={size}-{config}",
        f"data.train_path={data['train']}",
        f"data.val_path={data['val']}",
        f"data.max_len={w['max_len']}",
        f"data.max_prompt_len={w['max_prompt_len']}",
        f"train.num_workers={w['num_workers']}",
        f"train.batch_size={w['batch_size']}",
        f"train.max_steps={w['max_steps']}",
        f"train.eval_every={w['max_steps']}",
        f"train.checkpoint_every={w['max_steps']}",
        f"train.precision={w['precision']}",
        "train.max_failures=0",  # a configuration that crashes crashes again: report it at once
        f"dpo.prefix_sharing={str(w['prefix_sharing']).lower()}",
        f"eval.num_prompts={w['eval_prompts']}",
        f"eval.max_new_tokens={w['eval_new_tokens']}",
        f"eval.kl_samples={w['eval_kl_samples']}",
        f"eval.batch_size={w['eval_batch_size']}",
        "tracking.experiment=scale",
        *CONFIGS[config],
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray of its own
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env |= {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cell.mkdir(parents=True, exist_ok=True)
    log_path = cell / "align.log"
    command = [sys.executable, str(ALIGN), "--config", str(BASE_CONFIG), *overrides]
    load_before, started = load_average(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        poller = Poller(proc.pid)
        poller.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # the pipeline shuts its Ray down
            try:
                returncode = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
            returncode = returncode if returncode else -1
        poller.sample()
        poller.stop()
        _stop_tree(poller)
    wall = time.perf_counter() - started
    output = log_path.read_text(errors="replace")
    if returncode == 0:
        status = "ok"
    elif wall >= timeout_s:
        status = f"crashed: timed out after {timeout_s:.0f} s ({last_error_line(output)})"
    else:
        status = f"crashed: {last_error_line(output)}"
    processes = sorted(poller.procs.values(), key=lambda p: (p["kind"] or "~", p["pid"]))
    peaks = {kind: sorted((p["hwm_kb"] * 1024 for p in processes if p["kind"] == kind), reverse=True) for kind in KINDS}
    return dict(
        size=size,
        config=config,
        status=status,
        returncode=returncode,
        wall_s=wall,
        load_before=load_before,
        load_after=load_average(),
        peaks=peaks,  # bytes, per process of each kind, largest first
        processes=[p for p in processes if p["kind"]],
        log_tail=None if returncode == 0 else output.splitlines()[-40:],
        command=" ".join(command[1:]),
    )


# ------------------------------------------------------------------------------------------------ growth and targets


def growth_rows(cells: list[dict], fp32_bytes: int, sizes: tuple[str, str] = ("tiny", "0.3b")) -> list[dict]:
    """Per (config, kind): peak at each size (the largest process of the kind), growth / fp32 size, target met."""
    small, big = sizes
    by = {(c["size"], c["config"]): c for c in cells}
    rows = []
    for config in CONFIGS:
        a, b = by.get((small, config)), by.get((big, config))
        if a is None or b is None:
            continue
        for kind in KINDS:
            pa, pb = a["peaks"].get(kind) or [], b["peaks"].get(kind) or []
            if not pa or not pb:
                row = dict(config=config, kind=kind, note="not measured (no such process)")
                if a["status"] != "ok" or b["status"] != "ok":
                    row["note"] = "crashed before this stage"
                rows.append(row)
                continue
            growth = pb[0] - pa[0]
            row = dict(
                config=config,
                kind=kind,
                tiny_mb=pa[0] / 2**20,
                big_mb=pb[0] / 2**20,
                big_all_mb=[p / 2**20 for p in pb],
                growth_mb=growth / 2**20,
                growth_x=growth / fp32_bytes,
                complete=a["status"] == "ok" and b["status"] == "ok",
            )
            target = None
            if kind == "driver":
                target = TARGETS["driver"]
            elif kind == "train_worker" and config in ("lora", "lora_ckpt"):
                target = TARGETS["lora_train_worker"]
            elif kind in ("eval_actor", "reference_pass") and config in ("lora", "lora_ckpt"):
                target = TARGETS["eval_actor"]
            if target is not None:
                row["target_x"] = target
                row["met"] = bool(row["complete"] and row["growth_x"] <= target)
            rows.append(row)
    fsdp = next((r for r in rows if r["config"] == "fsdp" and r["kind"] == "train_worker" and "growth_x" in r), None)
    ddp = next((r for r in rows if r["config"] == "ddp_full" and r["kind"] == "train_worker" and "growth_x" in r), None)
    if fsdp is not None and ddp is not None:
        fsdp["vs_ddp_full"] = fsdp["growth_mb"] / ddp["growth_mb"]
        fsdp["target_vs_ddp_full"] = TARGETS["fsdp_over_ddp_full"]
        within = fsdp["vs_ddp_full"] <= TARGETS["fsdp_over_ddp_full"]
        fsdp["met"] = bool(fsdp["complete"] and ddp["complete"] and within)
    return rows


def _verdict(row: dict) -> str:
    if "met" not in row:
        return ""
    if not row.get("complete", False):
        return "NOT met (crashed)"
    return "met" if row["met"] else "NOT met"


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, LoRA only: checks the harness runs")
    ap.add_argument("--sizes", nargs="+", choices=tuple(SHAPES), default=None)
    ap.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=None)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per cell before it counts as crashed")
    ap.add_argument("--work-dir", default=None, help="keep models, runs and logs here (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scale[_smoke].json)")
    args = ap.parse_args()
    sizes = args.sizes or (["tiny"] if args.smoke else ["tiny", "0.3b"])
    configs = args.configs or (["lora"] if args.smoke else list(CONFIGS))

    env = setup(threads=2) | dict(cpu=cpu_model(), cpu_info=cpu_info())
    peak_size, peak_repeats = (512, 3) if args.smoke else (2048, 10)
    peaks = {
        "fp32_torch": matmul_peak(torch.float32, size=peak_size, repeats=peak_repeats)["flops"],
        "fp32_onednn": matmul_peak(torch.float32, size=peak_size, repeats=peak_repeats, backend="onednn")["flops"],
        "bf16_torch": matmul_peak(torch.bfloat16, size=peak_size, repeats=peak_repeats)["flops"],
    }
    print(f"cpu: {env['cpu']}; torch {torch.__version__}; load {load_average()}")
    print(
        f"matmul peaks ({peak_size}^2, median of {peak_repeats}): fp32 {peaks['fp32_torch'] / 1e9:.0f} GFLOP/s (MKL) / "
        f"{peaks['fp32_onednn'] / 1e9:.0f} (oneDNN), bf16 {peaks['bf16_torch'] / 1e9:.0f}",
        flush=True,
    )

    owned = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ray-dpo-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cells: list[dict] = []
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(TRAIN_DATA)
        texts = [t for column in ("prompt", "chosen", "rejected") for t in table[column].to_pylist()]
        tokenizer = train_tokenizer(texts, VOCAB)
        data = write_data(work)
        model_info = {}
        for size in sizes:
            started = time.perf_counter()
            model_info[size] = build_model(size, tokenizer, work / "models" / size)
            info = model_info[size]
            print(
                f"model {size}: {info['params'] / 1e6:.2f}M parameters, {info['fp32_bytes'] / 2**20:.0f} MiB in fp32 "
                f"(built in {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        for size in sizes:
            for config in configs:
                run = functools.partial(run_cell, size, config, model_info[size]["path"], data, work, args.timeout)
                cell = run()
                if RAY_STARTUP_FLAKE in cell["status"]:  # Ray's node start-up on an overloaded machine, not the code
                    print(f"  {size}/{config}: {cell['status']}; once more", flush=True)
                    time.sleep(30)
                    cell = run() | dict(retried=True)
                cells.append(cell)
                shown = ", ".join(
                    f"{kind} {max(v) / 2**20:.0f}" for kind, v in cell["peaks"].items() if v
                )  # the largest process of each kind
                print(f"  {size}/{config}: {cell['status']} in {cell['wall_s']:.0f} s; peak MiB: {shown}", flush=True)
    finally:
        if owned:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for cell in cells:
        for kind in KINDS:
            values = cell["peaks"].get(kind) or []
            if values:
                rows.append(
                    dict(
                        size=cell["size"],
                        config=cell["config"],
                        kind=kind,
                        n=len(values),
                        peak_mb=values[0] / 2**20,
                        all_mb=" / ".join(f"{v / 2**20:.0f}" for v in values),
                        fp32_mb=model_info[cell["size"]]["fp32_bytes"] / 2**20,
                        status=cell["status"][:90],
                    )
                )
    title = (
        f"Peak memory (VmHWM) per process, align.py, {WORKLOAD['num_workers']} CPU workers, {WORKLOAD['max_steps']} "
        f"steps x {WORKLOAD['batch_size']} pairs (max_len {WORKLOAD['max_len']}), eval {WORKLOAD['eval_prompts']} "
        f"prompts; {env['cpu']}"
    )
    columns = [
        ("size", "model", "s"),
        ("config", "config", "s"),
        ("kind", "process", "s"),
        ("n", "processes", "d"),
        ("peak_mb", "peak MiB (largest)", ".0f"),
        ("all_mb", "each MiB", "s"),
        ("fp32_mb", "model fp32 MiB", ".0f"),
        ("status", "run", "s"),
    ]
    print_table(title, rows, columns)

    growth = []
    if len(sizes) >= 2 and "0.3b" in model_info and "tiny" in model_info:
        growth = growth_rows(cells, model_info["0.3b"]["fp32_bytes"])
        for row in growth:
            row["verdict"] = _verdict(row)
            if "vs_ddp_full" in row:
                row["verdict"] += f" (FSDP/DDP-full growth {row['vs_ddp_full']:.2f}, target <= 0.6)"
        columns = [
            ("config", "config", "s"),
            ("kind", "process", "s"),
            ("tiny_mb", "tiny MiB", ".0f"),
            ("big_mb", "0.3b MiB", ".0f"),
            ("growth_mb", "growth MiB", ".0f"),
            ("growth_x", "growth / fp32 size", ".2f"),
            ("target_x", "target", ".2f"),
            ("verdict", "verdict", "s"),
            ("note", "note", "s"),
        ]
        fp32_mb = model_info["0.3b"]["fp32_bytes"] / 2**20
        title = f"Growth from tiny to 0.3b as a fraction of the 0.3b model's fp32 size ({fp32_mb:.0f} MiB)"
        print_table(title, growth, columns)

    out = args.out or f"benchmarks/results/scale{'_smoke' if args.smoke else ''}.json"
    payload = dict(
        smoke=args.smoke,
        env=env | dict(load_end=load_average()),
        matmul_peaks_flops=peaks,
        workload=WORKLOAD,
        configs={name: CONFIGS[name] for name in configs},
        models=model_info,
        targets=TARGETS,
        cells=cells,
        growth=growth,
        measure="VmHWM of /proc/<pid>/status, polled every 0.2 s; the driver and every Ray process descended from it",
    )
    print(f"\nwrote {write_json(out, payload)}")


if __name__ == "__main__":
    main()
