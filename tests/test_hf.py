"""Bring your own model: tiny random Hugging Face causal LMs (Qwen2, Llama) built from a config, a real BPE tokenizer
trained offline with a chat template; DPO on them against float64 references, LoRA, chat templates, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from conftest import pipeline_main
from tiny_hf import build

from ray_dpo.core.dpo import DPO
from ray_dpo.core.encoding import chat_head, encode_chat, keep_prompt_end
from ray_dpo.core.logps import LogpsModel, core_model
from ray_dpo.core.tokenizer import PretrainedTokenizer
from ray_dpo.stages.models import add_lora

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: build(root / arch, arch=arch, vocab_size=400) for arch in ("qwen2", "llama")}


def _load(path: Path, dtype=torch.float64, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


def _pairs(vocab: int, seed: int = 0):
    """[prompt, response, pad] rows sharing prompts, as the trainer's batches hold them."""
    g = torch.Generator().manual_seed(seed)
    p, c, r = torch.tensor([3, 5, 2]), torch.tensor([4, 2, 6]), torch.tensor([2, 5, 3])
    width = int((p + torch.maximum(c, r)).max())
    chosen, rejected = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for i in range(3):
        prompt = torch.randint(5, vocab, (int(p[i]),), generator=g)
        chosen[i, : p[i] + c[i]] = torch.cat((prompt, torch.randint(5, vocab, (int(c[i]),), generator=g)))
        rejected[i, : p[i] + r[i]] = torch.cat((prompt, torch.randint(5, vocab, (int(r[i]),), generator=g)))
    return dict(chosen=chosen, rejected=rejected, prompt_len=p, chosen_len=c, rejected_len=r)


def _hand_logps(model, seq: torch.Tensor, p: int, n: int) -> torch.Tensor:
    """Sum of log p(token t) over the n response tokens of one unpadded row, from full float64 logits."""
    logits = model(seq[None, : p + n]).logits[0].double()
    log_probs = logits.log_softmax(-1)
    return sum(log_probs[t - 1, seq[t]] for t in range(p, p + n))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize(
    ("prefix_sharing", "attn"), [(False, "eager"), (False, "sdpa"), (True, "eager"), (True, "sdpa")]
)
@pytest.mark.parametrize("pack_len", [None, 24])  # packed: the three pairs in two rows
def test_dpo_on_hf_models_equals_a_float64_hand_reference(hf_dirs, arch, prefix_sharing, attn, pack_len):
    """Loss, rewards and every gradient: DPO's chunked head (and packed prefix-sharing rows, and rows packed with
    whole pairs (`data.packing`), with a 4-D mask and position ids, under both attention implementations) against a
    row-by-row float64 reference written here from full logits."""
    policy, reference = _load(hf_dirs[arch], attn=attn), _load(hf_dirs[arch], attn=attn)
    with torch.no_grad():  # a policy that differs from its reference
        for param in policy.parameters():
            param.add_(0.02 * torch.randn_like(param))
    batch, beta = _pairs(policy.config.vocab_size), 0.3
    dpo = DPO(
        LogpsModel(policy), ref_model=LogpsModel(reference), beta=beta, prefix_sharing=prefix_sharing, pack_len=pack_len
    )
    loss, metrics = dpo.batch_loss(batch)
    loss.backward()
    got = {name: p.grad.clone() for name, p in policy.named_parameters()}

    twin = _load(hf_dirs[arch], attn="eager")  # the plainest attention: softmax(QK^T + mask) V, in float64
    twin.load_state_dict(policy.state_dict())
    reference = _load(hf_dirs[arch], attn="eager")
    losses, margins = [], []
    for i in range(3):
        p, c, r = (int(batch[k][i]) for k in ("prompt_len", "chosen_len", "rejected_len"))
        with torch.no_grad():
            ref_c, ref_r = (
                _hand_logps(reference, batch["chosen"][i], p, c),
                _hand_logps(reference, batch["rejected"][i], p, r),
            )
        h = (_hand_logps(twin, batch["chosen"][i], p, c) - ref_c) - (
            _hand_logps(twin, batch["rejected"][i], p, r) - ref_r
        )
        losses.append(-F.logsigmoid(beta * h))
        margins.append(beta * h.detach())
    expected = torch.stack(losses).mean()
    expected.backward()
    # exact on the same rows and kernel; otherwise to float32 precision: transformers' eager attention takes its
    # softmax in float32 (even for float64 inputs) and the packed rows' softmax spans other keys than the unpadded
    # ones; PyTorch's CPU SDPA kernels round differently from eager
    exact = attn == "eager" and not prefix_sharing and pack_len is None
    tol = dict(atol=1e-12, rtol=1e-9) if exact else dict(atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(loss, expected, **tol)
    torch.testing.assert_close(metrics["rewards/margins"], torch.stack(margins).mean(), **tol)
    for name, param in twin.named_parameters():
        torch.testing.assert_close(got[name], param.grad, **tol)


def test_lora_trains_adapters_only_and_its_reference_is_the_base(hf_dirs):
    """DPO with LoRA: the reference is the same model with adapters off (one copy of the base weights), equal to
    the initial model; after training only adapter weights changed."""
    base = _load(hf_dirs["qwen2"], torch.float32)
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    tokens = torch.randint(5, 400, (2, 9))
    with torch.no_grad():
        initial_logits = base(tokens).logits
    peft = add_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules="all-linear", seed=0)
    with torch.no_grad():  # adapters start at zero (B = 0): move them so that "off" is observable
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    dpo = DPO(LogpsModel(peft), ref_model=LogpsModel(peft, adapters_disabled=True), beta=0.1)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, _ = dpo.batch_loss(_pairs(400))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad(), peft.disable_adapter():
        torch.testing.assert_close(peft(tokens).logits, initial_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (peft(tokens).logits - initial_logits).abs().max() > 1e-3, "the adapters change the policy"
    changed = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert changed and all("lora_" in n for n in changed)
    merged_free = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft.state_dict().items()
    }
    for name, value in initial.items():
        torch.testing.assert_close(merged_free[name], value, atol=0, rtol=0, msg=name)  # base weights untouched
    base_params = {p.data_ptr() for n, p in core_model(dpo.ref_model).named_parameters() if "lora_" not in n}
    policy_params = {p.data_ptr() for n, p in peft.named_parameters() if "lora_" not in n}
    assert base_params == policy_params, "the reference holds no copy of the base weights"


def test_tr_dpo_with_lora_syncs_a_reference_adapter_set_on_the_same_base(hf_dirs):
    """TR-DPO with LoRA: the reference is a second adapter set ("reference"), scored by switching the active adapter
    (the trained adapters keep requires_grad), synced from the trained one in float64: alpha * trained +
    (1 - alpha) * reference; it starts as the base itself."""
    from ray_dpo.core.dpo import mix_into
    from ray_dpo.stages import models

    base = _load(hf_dirs["qwen2"], torch.float64)
    peft = add_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules="all-linear", seed=0)
    models.add_reference_adapter(peft)
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable), "the reference adapters are frozen"
    policy, reference = LogpsModel(peft), LogpsModel(peft, adapter=models.REFERENCE_ADAPTER)
    base_only = LogpsModel(peft, adapters_disabled=True)
    batch = _pairs(400)
    score = lambda m: DPO(m, reference="none").batch_pairs(batch).chosen.detach()
    torch.testing.assert_close(score(reference), score(base_only), atol=1e-12, rtol=0)  # B = 0 in both sets
    with torch.no_grad():  # the trained adapters move
        for name, param in peft.named_parameters():
            if ".default." in name:
                param.add_(0.05 * torch.randn_like(param))
    pairs = models.reference_adapter_pairs(peft)
    before = {name: ref.detach().clone() for name, ref, _ in pairs}
    mix_into([(ref, trained) for _, ref, trained in pairs], 0.25)
    for name, ref, trained in pairs:
        torch.testing.assert_close(ref, 0.25 * trained + 0.75 * before[name], atol=1e-15, rtol=0, msg=name)
    assert {n for n, p in peft.named_parameters() if p.requires_grad} == trainable, "switching left grads alone"
    assert peft.active_adapter == models.TRAINED_ADAPTER
    assert (score(reference) - score(policy)).abs().max() > 1e-4, "the reference runs its own adapters"
    mix_into([(ref, trained) for _, ref, trained in pairs], 1.0)  # a hard copy: the reference is the policy now
    torch.testing.assert_close(score(reference), score(policy), atol=1e-12, rtol=0)
    assert (score(policy) - score(base_only)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_chat_template_rendering_and_truncation(hf_dirs, arch):
    tokenizer = PretrainedTokenizer(hf_dirs[arch])
    conversation = [
        {"role": "user", "content": "How do I sort letters?"},
        {"role": "assistant", "content": "Alphabetically."},
        {"role": "user", "content": "And numbers?"},
    ]
    prompts, (chosen, rejected), head = encode_chat(
        ["Hello there", conversation],
        [["Hi!", "Ascending."], [[{"role": "assistant", "content": "Go away"}], "No"]],
        tokenizer,
    )
    hf = tokenizer.hf
    want_prompt = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    want_prompt = list(want_prompt["input_ids"] if hasattr(want_prompt, "keys") else want_prompt)
    assert prompts.rows()[1].tolist() == want_prompt
    full = hf.apply_chat_template(conversation + [{"role": "assistant", "content": "Ascending."}], tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert want_prompt + chosen.rows()[1].tolist() == full[: len(full) - 1]  # the template's trailing "\n" dropped
    for row in (*chosen.rows(), *rejected.rows()):
        assert row[-1] == tokenizer.eos_id and (row == tokenizer.eos_id).sum() == 1, "one eos, at the end"
    if tokenizer.bos_id is not None:
        assert all((row == tokenizer.bos_id).sum() == 1 for row in prompts.rows()), "no double bos"

    # a long prompt keeps the template's opening and its end (the generation prompt)
    keep = np.array([head + 6, head + 6])
    cut = keep_prompt_end(prompts, keep, head).rows()[1].tolist()
    assert cut[:head] == want_prompt[:head] and cut[head:] == want_prompt[-6:]
    assert head == chat_head(tokenizer) > 0


def test_bad_hf_settings_are_one_line_errors_that_write_nothing(hf_dirs, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer, GPT2Config, T5Config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t5 = tmp_path / "t5"
    T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    gpt2 = tmp_path / "gpt2"  # a causal LM without 4-D masks or position ids in packed rows
    GPT2Config(vocab_size=400, n_embd=16, n_layer=1, n_head=2).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(hf_dirs["qwen2"]).save_pretrained(gpt2)
    plain = tmp_path / "no-template"
    tokenizer = AutoTokenizer.from_pretrained(hf_dirs["qwen2"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "out"
    base = ["--config", str(ROOT / "configs" / "hf_tiny.yaml"), f"output_dir={out}", f"train.storage_path={out}/ray"]
    cases = [
        ([f"model.hf_path={tmp_path / 'nowhere'}"], "model.hf_path="),
        ([f"model.hf_path={t5}"], "is a t5 model, not a causal LM"),
        ([f"model.hf_path={hf_dirs['qwen2']}", f"data.tokenizer={plain}"], "has no chat template"),
        ([f"model.hf_path={hf_dirs['qwen2']}", "model.lora_target_modules=[nope]"], "match no module of"),
        (
            [f"model.hf_path={gpt2}", "model.lora_r=0", "dpo.prefix_sharing=false", "data.packing=true"],
            "data.packing=true needs a LlamaForCausalLM",
        ),
    ]
    main = pipeline_main("align")
    for overrides, message in cases:
        assert main(base + overrides) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert not out.exists()


def test_hf_tokenizer_pads_with_eos_and_encodes_without_specials(hf_dirs):
    qwen = PretrainedTokenizer(hf_dirs["qwen2"])
    assert qwen.bos_id is None and qwen.pad_id is not None and qwen.has_chat_template
    llama = PretrainedTokenizer(hf_dirs["llama"])
    assert llama.bos_id is not None and llama.encode("hi there")[0] != llama.bos_id
    column = pa.array(["hi there", "sort these"])
    from ray_dpo.core.encoding import encode_prompts

    rows = encode_prompts(column, llama).rows()
    assert [r[0] for r in rows] == [llama.bos_id] * 2 and rows[0][1:].tolist() == llama.encode("hi there")
    assert encode_prompts(column, qwen).rows()[0].tolist() == qwen.encode("hi there")  # no bos to add


def test_the_run_encoding_renders_training_pairs_with_the_chat_template(hf_dirs, ray_session):
    """configs/hf_tiny.yaml turns the chat template on: the encoding the checks build from the config carries it,
    and the pairs read with it are rendered (user turn with the generation prompt, assistant reply)."""
    from conftest import HH_TEST

    from ray_dpo.config import load_config
    from ray_dpo.recipe import check
    from ray_dpo.stages.data import read_preferences

    config = load_config(ROOT / "configs" / "hf_tiny.yaml", [f"model.hf_path={hf_dirs['qwen2']}"])
    encoding = check(config).encoding
    assert encoding.chat_template and encoding.max_len == config.data.max_len
    ds, _ = read_preferences(HH_TEST, encoding=encoding, on_bad_row="skip")
    row = ds.take(1)[0]
    text = encoding.tokenizer.decode(row["prompt"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n"), text[:200]
    replies = [encoding.tokenizer.decode(r["chosen"], skip_special_tokens=False) for r in ds.take(20)]
    assert any(reply.endswith("<|im_end|>") for reply in replies)  # the assistant turn closed (when it fits)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_greedy_decoding_with_its_kv_cache_equals_model_generate(hf_dirs, arch):
    """Our generate on a Hugging Face model (its own KV cache, left-padded prompts of different lengths) gives the
    tokens of `model.generate(do_sample=False)`, and the same with the cache off; filters keep their meaning."""
    from ray_dpo.core.sampling import generate

    model = _load(hf_dirs[arch], torch.float32)
    tokenizer = PretrainedTokenizer(hf_dirs[arch])
    texts = ["Hello there, how are you?", "Hi", "What is the capital of France? Tell me"]
    prompts = [torch.tensor(tokenizer.encode(t)) for t in texts]
    ours = generate(model, prompts, 12, temperature=0.0, eos_token=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    uncached = generate(model, prompts, 12, temperature=0.0, eos_token=tokenizer.eos_id, cache_kv=False)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            theirs = model.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_id)
        new = theirs[0, len(prompt) :].tolist()
        assert ours[row, : len(new)].tolist() == new, (row, ours[row].tolist(), new)
        assert uncached[row, : len(new)].tolist() == new
    top1 = generate(
        model,
        prompts,
        12,
        filter_logits_fn="top_k",
        filter_kwargs=dict(k=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(top1, generate(model, prompts, 12, temperature=0.0))  # top-k of 1 is greedy
