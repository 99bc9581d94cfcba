from collections import Counter

from workers.data.batching import micro_batch_per_rank, plan_batches, rank_share


def test_each_epoch_sees_every_example_and_batches_are_full() -> None:
    batches = plan_batches(n_examples=10, global_batch=4, n_epochs=2, seed=3)
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)
    first_epoch = Counter(i for b in batches[:3] for i in b)
    assert set(first_epoch) == set(range(10))
    assert sum(first_epoch.values()) == 12  # two examples repeat to fill the last batch


def test_the_plan_depends_only_on_the_seed() -> None:
    assert plan_batches(10, 4, 2, seed=3) == plan_batches(10, 4, 2, seed=3)
    assert plan_batches(10, 4, 2, seed=3) != plan_batches(10, 4, 2, seed=4)
    assert plan_batches(10, 4, 2, seed=3)[:3] != plan_batches(10, 4, 2, seed=3)[3:]


def test_ranks_split_a_global_batch_without_overlap() -> None:
    batch = [5, 1, 9, 3]
    shares = [rank_share(batch, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(batch)
    assert micro_batch_per_rank(batch_size=5, world_size=2) == 3
    assert micro_batch_per_rank(batch_size=1, world_size=4) == 1
