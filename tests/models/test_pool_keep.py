"""pool.keep: a lone pattern is one pattern (never one per character); a bad regex or value is named."""

from __future__ import annotations

import pytest
import yaml

from vlmerge.errors import VlmergeError
from vlmerge.merge.command import open_pool, read_recipe_file
from vlmerge.models.pool import Pool


def pool(tiny, keep) -> Pool:
    return Pool(target=str(tiny.llava), donors={"ja": str(tiny.ja)}, base=str(tiny.base), keep=keep, verbose=False)


def test_a_keep_string_is_one_pattern(tiny):
    listed = pool(tiny, ["mlp"])
    assert len(listed.plan.kept) == 3 * listed.plan.depth and all("mlp" in key for key in listed.plan.kept)
    single = pool(tiny, "mlp")
    assert single.plan.kept == listed.plan.kept and single.plan.tensors == listed.plan.tensors
    assert single.to_config()["keep"] == ["mlp"]


def test_a_recipe_pool_keep_string_is_one_pattern(tiny, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "op": "linear", "sources": ["target", "ja"],
        "pool": {"target": str(tiny.llava), "donors": {"ja": str(tiny.ja)}, "base": str(tiny.base), "keep": "mlp"},
    }))  # fmt: skip
    recipe, pool_cfg = read_recipe_file(path)
    opened = open_pool(pool_cfg)
    assert opened.options["keep"] == ["mlp"] and all("mlp" in key for key in opened.plan.kept)
    assert len(opened.plan.kept) == 3 * opened.plan.depth and len(opened.plan.tensors) > 0


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (["mlp["], r"pool.keep pattern 'mlp\[' is not a valid regular expression \(unterminated character set"),
        (5, r"pool.keep must be a list of strings, got 5; write it as keep: \[PATTERN, ...\]"),
        (["mlp", 3], r"pool.keep must be a list of strings, got \['mlp', 3\]"),
        ({"mlp": 1}, r"pool.keep must be a list of strings, got \{'mlp': 1\}"),
    ],
)
def test_bad_keep_is_named(tiny, keep, message):
    with pytest.raises(VlmergeError, match=message):
        pool(tiny, keep)
