"""ray_dpo.stages.reference: log-probs from the actor pool == log-probs computed directly with the model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HH_TEST

from ray_dpo.core.checkpoint import save_model
from ray_dpo.core.dpo import sequence_logps
from ray_dpo.core.encoding import Encoding
from ray_dpo.core.model import ModelConfig, TransformerLM
from ray_dpo.core.pairs import response_mask_from_lengths
from ray_dpo.core.tokenizer import ByteTokenizer
from ray_dpo.stages.data import read_preferences
from ray_dpo.stages.reference import add_reference_logps


def direct_logp(model, row, side):
    """One row, unpadded, no Ray: the reference the actor pool must reproduce."""
    seq = torch.as_tensor(np.concatenate([row["prompt"], row[side]]), dtype=torch.int64)[None]
    mask = response_mask_from_lengths(seq.shape[1], torch.tensor([len(row["prompt"])]), torch.tensor([len(row[side])]))
    with torch.no_grad():
        return float(sequence_logps(model, seq, mask, "sum")[0])


def test_actor_pool_reference_logps_equal_direct(ray_session, tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(max_seq_len=96, dim=32, depth=2, heads=2)).eval()
    save_model(tmp_path / "ref", model, ByteTokenizer())
    encoding = Encoding(ByteTokenizer(), max_len=96, max_prompt_len=64)
    ds, stats = read_preferences(HH_TEST, encoding=encoding, on_bad_row="skip")
    ds = ds.limit(120).materialize()
    rows = ds.take_all()

    # From a checkpoint directory, two actors (each loads the model once); order of rows is kept.
    scored = add_reference_logps(ds, str(tmp_path / "ref"), batch_size=16, concurrency=2)
    out = scored.take_all()
    assert len(out) == len(rows) and scored.schema().names[-2:] == ["ref_chosen_logp", "ref_rejected_logp"]
    # the token columns reach the trainer as they came (list<int32>), so its collate reads them as token rows
    types = scored.schema().base_schema
    assert all(str(types.field(k).type) == "list<item: int32>" for k in ("prompt", "chosen", "rejected")), types
    for side in ("chosen", "rejected"):
        got = np.array([r[f"ref_{side}_logp"] for r in out])
        assert str(scored.schema().base_schema.field(f"ref_{side}_logp").type) == "float"  # float32
        assert [list(r[side]) for r in out] == [list(r[side]) for r in rows]
        want = np.array([direct_logp(model, r, side) for r in rows])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.all(got < 0) and np.ptp(got) > 1.0  # real, row-dependent log-probs

    # An nn.Module passed in (pickled into the actor) gives the same numbers.
    again = add_reference_logps(ds, model, batch_size=32, concurrency=1)
    np.testing.assert_allclose(
        [r["ref_chosen_logp"] for r in again.take_all()], [r["ref_chosen_logp"] for r in out], rtol=1e-5, atol=1e-5
    )


def test_a_loss_without_a_reference_runs_no_reference_pass():
    """`dpo.reference=precomputed` with reference-free losses: the stage hands the data on untouched (no actor pool,
    no Ray: nothing here could run one)."""
    from types import SimpleNamespace

    from ray_dpo.config import load_config
    from ray_dpo.recipe.stages import Data, with_reference_logps

    config = load_config(None, ["dpo.reference=precomputed", "dpo.loss_type=[simpo, sft]"])
    data = Data(train=object(), val=object())
    assert with_reference_logps(SimpleNamespace(config=config), data, None) is data


def test_the_reference_pass_packs_and_scores_as_unpacked():
    """`PairScorer` (one actor's work, no Ray) with `data.packing`: packed rows, with and without prefix sharing, give
    the unpacked log-probs of every pair (float64: to rounding)."""
    import pyarrow as pa

    from ray_dpo.stages.reference import PairScorer

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(max_seq_len=96, dim=32, depth=2, heads=2)).double().eval()
    rng = np.random.default_rng(0)
    rows = {k: [rng.integers(3, 250, rng.integers(lo, 40)).tolist() for _ in range(20)] for k, lo in
            (("prompt", 1), ("chosen", 0), ("rejected", 1))}  # fmt: skip
    table = pa.table({k: pa.array(v, pa.list_(pa.int32())) for k, v in rows.items()})
    scored = {}
    for name, kwargs in {
        "unpacked": dict(prefix_sharing=False),
        "packed": dict(prefix_sharing=False, pack_len=160),
        "packed, prefix sharing": dict(prefix_sharing=True, pack_len=160),
    }.items():
        scorer = PairScorer({"ref": model}, device="cpu", bf16=False, **kwargs)
        scored[name] = scorer(table)
        assert scored[name].column_names == ["prompt", "chosen", "rejected", "ref_chosen_logp", "ref_rejected_logp"]
    for side in ("chosen", "rejected"):
        want = scored["unpacked"][f"ref_{side}_logp"].to_numpy()
        assert np.all(want < 0) and np.ptp(want) > 1.0
        for name in ("packed", "packed, prefix sharing"):
            np.testing.assert_allclose(scored[name][f"ref_{side}_logp"].to_numpy(), want, rtol=1e-6, atol=1e-6)


def test_the_cache_key_covers_the_weights_the_encoding_and_the_scoring(tmp_path):
    """Another reference (one byte of its weights), encoding or scoring setting is another key; the same ones, the
    same key (the weights' digest is kept beside them and read back)."""
    from ray.train import Checkpoint

    from ray_dpo.stages.reference import DIGEST_FILE, ReferenceCache

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(max_seq_len=32, dim=16, depth=1, heads=2))
    a, b = save_model(tmp_path / "a", model, ByteTokenizer()), save_model(tmp_path / "b", model, ByteTokenizer())
    weights = next(p for p in Path(b).iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    scoring = dict(precision="fp32", prefix_sharing=False, pack_len=None)

    def key(checkpoint, encoding=None, **changed):
        encoding = encoding or {"tokenizer": "byte", "max_len": 64}
        at = Checkpoint.from_directory(str(checkpoint))
        return ReferenceCache.for_reference(str(tmp_path), at, encoding=encoding, scoring=scoring | changed).key

    assert key(a) == key(a) and (Path(a) / DIGEST_FILE).is_file()
    others = [key(b), key(a, {"tokenizer": "byte", "max_len": 48}), key(a, pack_len=4096), key(a, precision="bf16")]
    assert len({key(a), *others}) == 5


def _as_lists(frame) -> dict[str, list]:
    return {column: [np.asarray(v).tolist() for v in frame[column]] for column in frame}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reference_logps_are_computed_once_and_reused_by_a_later_run(ray_session, tmp_path):
    """`dpo.reference=precomputed` with the cache: the first run computes (MLflow tag `computed`), a second run of
    another name on the same data and reference reads them (`reused`): the same rows in the same order with the same
    log-probs to the bit, so the same training batches and step-1 loss."""
    from mlflow import MlflowClient

    from ray_dpo.config import load_config
    from ray_dpo.recipe import open_run
    from ray_dpo.recipe.demo import write_sort_task
    from ray_dpo.recipe.stages import REFERENCE_TAG, load_data, starting_weights, with_reference_logps

    files = write_sort_task(tmp_path / "sort", rows=48, seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

    def run(name: str):
        settings = [f"output_dir={tmp_path / 'out'}", f"train.storage_path={tmp_path / 'ray'}", "data.synthetic=null"]
        settings += [f"data.train_path={files['train']}", "data.val_fraction=0.25", "dpo.reference=precomputed"]
        settings += [f"train.run_name={name}"]
        with open_run(load_config(tiny, settings), tracking_uri=uri) as opened:
            data = load_data(opened)
            reference = starting_weights(opened)  # a fresh seeded model, staged under this run's name
            data = with_reference_logps(opened, data, reference)
        tag = MlflowClient(uri).get_run(opened.run_id).data.tags[REFERENCE_TAG]
        return tag, data.train.to_pandas(), data.val.to_pandas()

    first, second = run("first"), run("second")
    assert [first[0], second[0]] == ["computed", "reused"]
    for computed, reused in zip(first[1:], second[1:], strict=True):
        assert np.isfinite(computed["ref_chosen_logp"]).all() and len(computed)
        assert _as_lists(reused) == _as_lists(computed)
    cached = list((tmp_path / "ray" / "reference_logps").glob("*/part-*.parquet"))
    assert len({p.parent for p in cached}) == 1 and len(cached) == 2  # one key: the train and val parts
