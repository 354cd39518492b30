"""Stage 1, data: Parquet -> validated, truncated, accounted token rows (`read`), their order and split (`order`), who
holds them (`handoff`: one copy in the object store at a time), and the padded batches a training worker consumes
(`batches`)."""

from ray_dpo.stages.data.batches import (
    PreferenceCollateFn,
    SFTCollateFn,
    collate_preferences,
    collate_sft,
)
from ray_dpo.stages.data.handoff import Handoff
from ray_dpo.stages.data.order import bucket_by_length, order_rows, split_and_order, split_train_val
from ray_dpo.stages.data.read import DataError, DataStats, read_preferences, read_prompts, read_sft

__all__ = [
    "DataError",
    "DataStats",
    "Handoff",
    "PreferenceCollateFn",
    "SFTCollateFn",
    "bucket_by_length",
    "collate_preferences",
    "collate_sft",
    "order_rows",
    "read_preferences",
    "read_prompts",
    "read_sft",
    "split_and_order",
    "split_train_val",
]
