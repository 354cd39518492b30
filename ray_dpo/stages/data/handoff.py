"""Who holds the token rows: one copy of them in the object store at a time.

A Ray object lives while any reference to it does, so each stage that rewrites the rows (order, split, the deal to
ranks) would keep the previous copy alive for as long as its caller holds the previous Dataset. A `Handoff` gives a
materialized dataset to ONE consumer: `block_refs` takes it out of the handoff, and the consumer drops each block as
soon as the task that rewrites it is submitted (Ray keeps an argument alive until its task has run), so the old
copy shrinks while the new one grows.

    rows = Handoff(dataset)
    del dataset  # the handoff must be the only holder, or nothing is freed
    train, val = split_and_order(rows, val_fraction=0.05, seed=0)

A plain Dataset given to the same functions is left as it was (it keeps its blocks).
"""

from __future__ import annotations

import gc

import ray


class Handoff:
    """A materialized dataset handed to one consumer, which frees its blocks as it goes (see the module doc)."""

    def __init__(self, dataset: ray.data.Dataset):
        self._dataset: ray.data.Dataset | None = dataset

    def _held(self) -> ray.data.Dataset:
        if self._dataset is None:
            raise RuntimeError("these rows were already handed to a consumer (a Handoff is taken once)")
        return self._dataset

    def count(self) -> int:
        return self._held().count()

    def columns(self) -> list[str]:
        return self._held().columns()

    def take(self) -> ray.data.Dataset:
        """The dataset; the handoff holds it no longer."""
        dataset, self._dataset = self._held(), None
        return dataset


def block_refs(rows: ray.data.Dataset | Handoff) -> list[ray.ObjectRef]:
    """The rows' Arrow blocks, in order. From a Handoff the list holds the ONLY references: the consumer frees a block
    by dropping its entry (`refs[i] = None`). From a Dataset the dataset keeps its own."""
    if not isinstance(rows, Handoff):
        return rows.to_arrow_refs()
    dataset = rows.take()
    refs = dataset.to_arrow_refs()
    del dataset
    # a Ray Dataset sits in reference cycles (its plan, its executions): it and the references to its blocks go only
    # when the cycle collector next runs, which could be long after its blocks were rewritten
    gc.collect()
    return refs
