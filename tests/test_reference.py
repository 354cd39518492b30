"""ray_dpo.stages.reference: log-probs from the actor pool == log-probs computed directly with the model."""

import numpy as np
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
