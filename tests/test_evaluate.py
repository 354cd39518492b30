"""`ray_dpo.stages.evaluate`: the policy/reference actor pool on a real local Ray, the metrics, the MLflow artifacts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray
import torch

from ray_dpo.config import Config, override
from ray_dpo.core.checkpoint import load_model, save_model
from ray_dpo.core.dpo import DPO, sequence_logps
from ray_dpo.core.encoding import Encoding
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.pairs import response_mask_from_lengths
from ray_dpo.core.sampling import generate
from ray_dpo.core.tokenizer import ByteTokenizer
from ray_dpo.errors import UserError
from ray_dpo.recipe.demo import make_prompt, write_sort_task
from ray_dpo.stages.evaluate import (
    ACTOR_COLUMN,
    SAMPLES_PAGE,
    SAMPLES_TABLE,
    aggregate,
    evaluate,
    evaluate_rows,
    load_reward_fn,
)

TOK = ByteTokenizer()
ENCODING = Encoding(TOK, max_len=48, max_prompt_len=32)
SMALL = ModelConfig(max_seq_len=48, dim=32, depth=2, heads=2)
PROMPTS = [make_prompt(letters) for letters in ("dcba", "jig", "aebfc", "hgfedc", "bca", "gfhi", "cadb", "jihgfe")] + [
    "x" * n
    for n in range(1, 9)  # lengths 2..9 with bos: very different prompt lengths in one batch
]


def _checkpoint(tmp_path, name: str, seed: int, model: TransformerLM | None = None) -> str:
    if model is None:
        torch.manual_seed(seed)
        model = TransformerLM(SMALL)
        for p in model.parameters():  # a bolder init than std 0.02: clear arg-max margins, no near-ties
            p.data.normal_(0, 0.3)
    return str(save_model(tmp_path / name, model, TOK))


def _config(**eval_overrides) -> Config:
    # fp32: the pool's models are compared with direct fp32 decoding (under bf16 they are held in bf16)
    values = {"eval.max_new_tokens": 6, "eval.temperature": 0.0, "eval.batch_size": 4, "train.precision": "fp32"}
    return override(Config(), values | {f"eval.{k}": v for k, v in eval_overrides.items()})


def generate_samples(config: Config, **kwargs) -> pd.DataFrame:
    """The sample rows of the evaluation pool (no pairs to score)."""
    return evaluate_rows(config, preference_ds=None, encoding=ENCODING, **kwargs)[0]


def _encode(prompt: str) -> torch.Tensor:
    return torch.tensor([TOK.bos_id, *TOK.encode(prompt)])


def _prompts_ds(prompts: list[str]) -> ray.data.Dataset:
    """Prompt token rows, as the validation split of `read_preferences` holds them."""
    tokens = pa.array([_encode(p).tolist() for p in prompts], pa.list_(pa.int32()))
    return ray.data.from_arrow(pa.table({"prompt": tokens}))


def test_actor_pool_with_two_actors_equals_direct_greedy_generate(ray_session, tmp_path):
    policy_dir, reference_dir = _checkpoint(tmp_path, "policy", 1), _checkpoint(tmp_path, "reference", 2)
    config = _config(concurrency=2)
    prompts_ds = _prompts_ds(PROMPTS)

    samples = generate_samples(
        config, policy_checkpoint=policy_dir, reference_checkpoint=reference_dir, prompts_ds=prompts_ds
    )

    assert samples[ACTOR_COLUMN].nunique() == 2, "both actors of the pool generated"
    assert samples["prompt"].tolist() == PROMPTS, "rows keep the prompts' order"
    encoded = [_encode(p) for p in PROMPTS]
    for name, directory in (("policy", policy_dir), ("reference", reference_dir)):
        model = load_model(directory).eval()
        direct = generate(model, encoded, 6, temperature=0.0, eos_token=TOK.eos_id, pad_id=TOK.pad_id)
        for row, tokens in enumerate(direct.tolist()):
            if TOK.eos_id in tokens:  # a row that emitted eos is padded after it; one that did not fills the width
                tokens = tokens[: tokens.index(TOK.eos_id) + 1]
            assert samples[f"{name}_len"][row] == len(tokens)
            text = TOK.decode([t for t in tokens if t not in (TOK.eos_id, TOK.bos_id, TOK.pad_id)])
            assert samples[f"{name}_response"][row] == text, (name, PROMPTS[row])
            # the sequence log-prob of this response under this model, computed directly
            seq = torch.tensor([[*encoded[row].tolist(), *tokens]])
            mask = response_mask_from_lengths(
                seq.shape[1], torch.tensor([len(encoded[row])]), torch.tensor([len(tokens)])
            )
            with torch.no_grad():
                expected = sequence_logps(model, seq, mask).item()
            assert samples[f"{name}_logp_{name}"][row] == pytest.approx(expected, abs=1e-4)


def _dpo_steps(reference_dir: str, steps: int) -> TransformerLM:
    """A few DPO steps (torch only) on sort pairs: chosen = sorted, rejected = reversed."""
    torch.manual_seed(0)
    dpo = DPO(load_model(reference_dir), beta=0.1, pad_id=TOK.pad_id)
    optimizer = torch.optim.AdamW(dpo.parameters(), lr=3e-3)
    letters = ["dcba", "jig", "aebfc", "hgfedc", "bca", "gfhi", "cadb", "jihgfe"]
    prompts = [_encode(make_prompt(x)).tolist() for x in letters]
    chosen = [p + TOK.encode("".join(sorted(x))) + [TOK.eos_id] for p, x in zip(prompts, letters, strict=True)]
    rejected = [p + TOK.encode("".join(sorted(x))[::-1]) + [TOK.eos_id] for p, x in zip(prompts, letters, strict=True)]
    width = max(map(len, chosen))
    pad = lambda rows: torch.tensor([r + [TOK.pad_id] * (width - len(r)) for r in rows])
    prompt_len = torch.tensor([len(p) for p in prompts])
    response_len = torch.tensor([len(c) - len(p) for c, p in zip(chosen, prompts, strict=True)])
    batch = dict(chosen=pad(chosen), rejected=pad(rejected), prompt_len=prompt_len)
    batch |= dict(chosen_len=response_len, rejected_len=response_len)
    for _ in range(steps):
        loss, _ = dpo.batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dpo.policy_model


def test_kl_is_zero_for_identical_models_and_positive_after_training(ray_session, tmp_path, mlflow_uri):
    from ray_dpo.stages import tracking

    reference_dir = _checkpoint(tmp_path, "reference", 3)
    config = _config(temperature=1.0, concurrency=1, batch_size=8, kl_samples=4)
    prompts_ds = _prompts_ds(PROMPTS)

    same = generate_samples(
        config, policy_checkpoint=reference_dir, reference_checkpoint=reference_dir, prompts_ds=prompts_ds
    )
    same_metrics = aggregate(same, None, beta=0.1)
    assert same_metrics["eval/kl_seq"] == 0.0 and same_metrics["eval/kl_token"] == 0.0
    assert (same["policy_response"] == same["reference_response"]).all(), "same model, same seed: same samples"

    policy_dir = _checkpoint(tmp_path, "policy", 0, model=_dpo_steps(reference_dir, steps=40))
    run_id = tracking.start_run(mlflow_uri, experiment="eval-test", run_name="kl")
    metrics = evaluate(
        config,
        policy_checkpoint=policy_dir,
        reference_checkpoint=reference_dir,
        prompts_ds=prompts_ds,
        preference_ds=None,
        encoding=ENCODING,
        mlflow_run=(mlflow_uri, run_id),
    )
    assert metrics["eval/kl_seq"] > 0.3 and metrics["eval/kl_token"] > 0.03, metrics  # 0.58 / 0.096 at 20 steps
    assert 0 < metrics["eval/kl_seq_se"] < metrics["eval/kl_seq"], metrics
    logged = tracking.client(mlflow_uri).get_run(run_id).data.metrics
    assert logged["eval/kl_seq"] == pytest.approx(metrics["eval/kl_seq"])
    table = tracking.load_table(mlflow_uri, run_id, SAMPLES_TABLE)
    assert len(table) == len(PROMPTS) and ACTOR_COLUMN not in table.columns
    assert {"prompt", "policy_response", "reference_response", "policy_logp_reference"} <= set(table.columns)
    page = tracking.download_artifacts(mlflow_uri, run_id, SAMPLES_PAGE, tmp_path / "page").read_text()
    assert "<table>" in page and "eval/kl_seq" in page


def test_aggregate_win_rate_ties_count_half_and_implicit_reward_accuracy():
    samples = pd.DataFrame(
        {
            "policy_reward": [1.0, 1.0, 0.0, 0.0],
            "reference_reward": [0.0, 1.0, 0.0, 1.0],  # win, tie, tie, loss -> (1 + .5 + .5 + 0) / 4
            "sample_kl": [1.0, 0.0, 2.0, 0.0],  # per prompt: mean of log pi - log ref over the policy's samples
            "sample_len": [2, 4, 4, 1],
            "policy_len": [2, 4, 4, 1],
            "reference_len": [3, 3, 3, 3],
        }
    )
    pairs = pd.DataFrame(
        {
            "policy_chosen_logp": [-1.0, -5.0, -2.0],
            "reference_chosen_logp": [-2.0, -4.0, -2.0],  # chosen log-ratios 1, -1, 0
            "policy_rejected_logp": [-3.0, -3.0, -2.0],
            "reference_rejected_logp": [-2.0, -4.0, -2.0],  # rejected log-ratios -1, 1, 0 (a tie is not a win)
        }
    )
    m = aggregate(samples, pairs, beta=0.5)
    assert m["eval/win_rate"] == 0.5
    assert m["eval/reward/policy"] == 0.5 and m["eval/reward/reference"] == 0.5
    assert m["eval/kl_seq"] == pytest.approx(0.75)
    assert m["eval/kl_seq_se"] == pytest.approx(np.std([1.0, 0.0, 2.0, 0.0], ddof=1) / 2)
    assert m["eval/kl_token"] == pytest.approx(3 / 11)
    assert m["eval/len/policy"] == 2.75 and m["eval/len/reference"] == 3.0
    assert m["eval/implicit_reward_accuracy"] == pytest.approx(1 / 3)
    assert m["eval/implicit_reward_margin"] == pytest.approx(0.5 * (2 - 2 + 0) / 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ray_dpo.recipe.demo", "must look like 'module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("ray_dpo.recipe.demo:no_such_fn", "has no function 'no_such_fn'"),
    ],
)
def test_bad_reward_fn_is_a_one_line_config_error(spec, message):
    with pytest.raises(UserError, match=message):
        load_reward_fn(spec)
    assert load_reward_fn("ray_dpo.recipe.demo:exact_match_reward")(["sort: cab ="], ["abc"]) == [1.0]


def test_evaluate_pipeline_standalone_logs_a_run_and_fails_in_one_line(ray_session, tmp_path, monkeypatch, capsys):
    """`python pipelines/evaluate.py --checkpoint ... --reference ...` (in-process, on the session's Ray)."""
    from ray_dpo.stages import tracking

    spec = importlib.util.spec_from_file_location(
        "evaluate_pipeline", Path(__file__).parents[1] / "pipelines" / "evaluate.py"
    )
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    policy_dir, reference_dir = _checkpoint(tmp_path, "policy", 1), _checkpoint(tmp_path, "reference", 2)
    val = write_sort_task(tmp_path / "data", rows=64, seed=0)["val"]
    args = ["--checkpoint", policy_dir, "--reference", reference_dir, "--prompts", val, "--pairs", val]
    overrides = [f"output_dir={tmp_path / 'out'}", "eval.num_prompts=12", "eval.max_new_tokens=6", "eval.concurrency=1"]

    assert pipeline.main(args + overrides) == 0
    out = capsys.readouterr().out
    assert "eval reward:      reference" in out and "on 64 held-out pairs" in out
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    (run,) = tracking.client(uri).search_runs([tracking.get_or_create_experiment(uri, "ray-dpo-demo")])
    assert run.info.status == "FINISHED" and run.data.metrics["eval/num_prompts"] == 12
    assert run.data.params["eval.policy_checkpoint"] == policy_dir

    assert pipeline.main(["--checkpoint", str(tmp_path), "--reference", reference_dir, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint:") and "\n" not in err


def test_kl_estimator_matches_exact_kl_within_its_standard_error(ray_session, tmp_path):
    """Two hand-built policies over responses of at most 2 tokens: the exact KL(policy || reference) is a finite
    sum (every first token, then every second token); the pipeline's estimate from samples (actor pool, temperature
    1, 48 per prompt) lands within 3 standard errors of it, and the standard error is small."""
    policy_dir, reference_dir = _checkpoint(tmp_path, "policy", 5), _checkpoint(tmp_path, "reference", 6)
    prompts = PROMPTS[:6]
    config = _config(max_new_tokens=2, kl_samples=48, concurrency=1, batch_size=6)
    samples = generate_samples(
        config, policy_checkpoint=policy_dir, reference_checkpoint=reference_dir, prompts_ds=_prompts_ds(prompts)
    )
    metrics = aggregate(samples, None, beta=0.1)

    policy, reference = load_model(policy_dir).double().eval(), load_model(reference_dir).double().eval()

    def exact_kl(prompt: str) -> float:
        x = _encode(prompt)
        with torch.no_grad():
            first_p, first_q = (m(x[None])[0, -1].log_softmax(-1) for m in (policy, reference))
            seconds = torch.cat((x.expand(TOK.vocab_size, -1), torch.arange(TOK.vocab_size)[:, None]), dim=1)
            second_p, second_q = (m(seconds)[:, -1].log_softmax(-1) for m in (policy, reference))
        inner = (second_p.exp() * (second_p - second_q)).sum(-1)  # KL of the second token given each first
        inner[TOK.eos_id] = 0.0  # a response that ends at eos has no second token
        return float((first_p.exp() * (first_p - first_q + inner)).sum())

    exact = np.mean([exact_kl(p) for p in prompts])
    estimate, se = metrics["eval/kl_seq"], metrics["eval/kl_seq_se"]
    assert exact > 0.2 and se < 0.25 * exact, (exact, estimate, se)  # a real KL, measured precisely enough
    assert abs(estimate - exact) < 3 * se, (exact, estimate, se)


def test_kl_estimate_of_categorical_samples():
    """The estimator alone, on two categorical distributions: within 3 standard errors of the exact KL."""
    from ray_dpo.stages.evaluate import kl_estimate

    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    exact = float((p * np.log(p / q)).sum())
    draws = rng.choice(6, size=(300, 4), p=p)  # 300 "prompts", 4 samples each
    estimate, se = kl_estimate(np.log(p)[draws], np.log(q)[draws])
    assert abs(estimate - exact) < 3 * se and se < 0.1 * exact, (exact, estimate, se)
