"""Math split sizes up to the toy world's distinct-question limit are made, whatever split comes last: when the
random draws stall (few distinct texts left, each rarely drawn) the split is filled from the unused texts in a
seeded order; a split the draws fill is as before."""

import pytest

from vlmerge.toy import problems as P
from vlmerge.toy import splits

SMALL_WORLD = P.ProblemConfig(operand_range=(1, 2), ops=("+", "-", "×"), factor_range=(2, 3))  # 720 texts


@pytest.mark.parametrize(("search", "heldout"), [(719, 1), (1, 719), (710, 10), (360, 360)])
def test_math_sizes_up_to_the_limit_are_made_deterministically(search, heldout):
    config = splits.EvalSetConfig(math_search_size=search, math_heldout_size=heldout, math=SMALL_WORLD)
    assert search + heldout == splits.math_capacity(SMALL_WORLD)
    made = splits.math_splits(config)
    assert {split: len(items) for split, items in made.items()} == {"search": search, "heldout": heldout}
    problems = made["search"] + made["heldout"]
    texts = {P.question(p, "ja") for p in problems}
    assert len(texts) == len(problems) == len({p.id for p in problems})  # every text once, ids unique
    assert all(P.answer_text(p) == str(p.answer) and p.answer >= 0 for p in problems)
    assert splits.math_splits(config) == made


def test_a_split_the_draws_fill_is_unchanged_and_only_a_stalled_one_is_topped_up():
    config = splits.EvalSetConfig(math_search_size=710, math_heldout_size=10, math=SMALL_WORLD)
    made = splits.math_splits(config)
    drawn = P.make_problems(101 * 710, config.split_seed("search"), SMALL_WORLD)
    assert set(made["search"]) <= set(drawn)  # the search split: random draws only
    rest = [p for p in made["heldout"] if "-r" in p.id]
    assert rest and made["heldout"][-len(rest):] == rest  # the held-out split: its draws, then the unused texts
