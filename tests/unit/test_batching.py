import numpy as np
import torch

from fedit.client.batching import IGNORE_INDEX, collate, plan_batches, split_micro_batches


def padding_share(batches: list[list[int]], lengths: list[int], micro: int) -> float:
    computed = real = 0
    for batch in batches:
        for chunk in split_micro_batches(batch, lengths, micro):
            computed += max(lengths[i] for i in chunk) * len(chunk)
            real += sum(lengths[i] for i in chunk)
    return 1 - real / computed


def test_plan_gives_exact_steps_and_covers_epochs() -> None:
    lengths = list(range(1, 21))
    batches = plan_batches(lengths, batch_size=8, num_steps=5, seed=0)
    assert len(batches) == 5
    first_epoch = [i for b in batches[:3] for i in b]  # 20 records = 8 + 8 + 4
    assert sorted(first_epoch) == list(range(20))


def test_plan_is_deterministic_per_seed() -> None:
    lengths = list(np.random.default_rng(0).integers(5, 200, size=64))
    assert plan_batches(lengths, 8, 6, seed=1) == plan_batches(lengths, 8, 6, seed=1)
    assert plan_batches(lengths, 8, 6, seed=1) != plan_batches(lengths, 8, 6, seed=2)


def test_length_grouping_cuts_padding() -> None:
    lengths = [int(x) for x in np.random.default_rng(0).integers(10, 250, size=400)]
    grouped = plan_batches(lengths, 8, 50, seed=0, group_by_length=True)
    random_order = plan_batches(lengths, 8, 50, seed=0, group_by_length=False)
    assert padding_share(grouped, lengths, 4) < 0.1 < padding_share(random_order, lengths, 4)


def test_collate_pads_right_and_masks_padding() -> None:
    rows = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])]
    batch = collate(rows, pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_token_cap_splits_long_micro_batches_only() -> None:
    lengths = [100, 30, 250, 40, 260, 20, 35, 90]
    batch = list(range(8))
    assert split_micro_batches(batch, lengths, 8) == [[4, 2, 0, 7, 3, 6, 1, 5]]
    capped = split_micro_batches(batch, lengths, 8, max_tokens=300)
    # widths 260 and 250 alone; 100 x 3 rows = 300 fits; the short rows share one forward
    assert capped == [[4], [2], [0, 7, 3], [6, 1, 5]]
    assert sorted(i for chunk in capped for i in chunk) == batch
    for chunk in capped:
        assert len(chunk) * max(lengths[i] for i in chunk) <= 300 or len(chunk) == 1
    assert split_micro_batches(batch, lengths, 2, max_tokens=10_000) == [
        [4, 2], [0, 7], [3, 6], [1, 5]
    ]  # fmt: skip
    assert split_micro_batches([0], [500], 4, max_tokens=100) == [[0]]  # one row always runs


def test_token_cap_counts_every_row_of_an_item() -> None:
    # a DPO pair is 2 rows of its length: 100 x 2 x 3 pairs = 600 > 500, 2 pairs fit
    lengths = [100, 90, 80, 30]
    capped = split_micro_batches([0, 1, 2, 3], lengths, 8, max_tokens=500, rows_per_item=2)
    assert capped == [[0, 1], [2, 3]]
