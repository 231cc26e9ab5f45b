"""`run --sample K`: which lines a sample draws, and what it projects for the whole file."""

from __future__ import annotations

import json

from pipeline.sample import Sampler, sample_cost


def rows(count: int, prompt: str = "otter") -> list[tuple[object, ...]]:
    return [(line, f"c{line}", json.dumps({"model": "flux-2-dev", "prompt": f"{prompt} {line}"}),
             None) for line in range(1, count + 1)]


def drawn(size: int, lines: list[tuple[object, ...]]) -> list[int]:
    sampler = Sampler(size)
    for row in lines:
        sampler.offer(row, row[0])
    return sampler.chosen()


def test_the_same_file_draws_the_same_lines_in_line_order() -> None:
    first, again = drawn(20, rows(1000)), drawn(20, rows(1000))
    assert first == again == sorted(first)
    assert len(set(first)) == 20


def test_another_file_draws_other_lines_and_a_big_file_draws_from_all_of_it() -> None:
    assert drawn(20, rows(1000)) != drawn(20, rows(1000, prompt="banana"))
    picked = drawn(100, rows(100_000))
    assert max(picked) > 50_000 > min(picked)  # not the first lines: drawn at random


def test_a_sample_as_large_as_the_file_takes_every_line() -> None:
    assert drawn(50, rows(10)) == list(range(1, 11))


def summary(sample: int, total: int, succeeded: int, failed: int, cents: int) -> dict:
    return {"sample_lines": sample, "items_total": total, "items_succeeded": succeeded,
            "items_failed": failed, "items_cancelled": 0, "spent_cents": cents}


def test_the_projection_is_the_samples_price_per_line_times_every_line() -> None:
    cost = sample_cost(summary(sample=20, total=1000, succeeded=20, failed=0, cents=60))
    assert (cost.lines, cost.total_lines, cost.cents, cost.projected_cents) == (20, 1000, 60, 3000)


def test_the_projection_rounds_to_the_nearest_cent_and_counts_failed_sampled_lines() -> None:
    # 7 cents over 3 lines (one failed, free) is 2.33 a line: 10 lines cost 23.33 -> 23.
    cost = sample_cost(summary(sample=3, total=10, succeeded=2, failed=1, cents=7))
    assert (cost.total_lines, cost.projected_cents) == (10, 23)
    assert cost.as_dict() == {"sample_lines": 3, "total_lines": 10, "sample_cents": 7,
                              "projected_cents": 23}
