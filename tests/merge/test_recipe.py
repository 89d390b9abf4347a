"""Recipe files: `sources` must be a list (a lone string is refused, never read one character at a time)."""

from __future__ import annotations

import pytest

from vlmerge.errors import VlmergeError
from vlmerge.merge.recipe import Recipe, load_recipe


def test_sources_list_is_read_in_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("op: linear\nsources: [target, ja]\n")
    assert load_recipe(path).sources == ("target", "ja")


@pytest.mark.parametrize("sources", ["target", "target, ja", "5"])
def test_sources_given_as_one_string_is_refused_with_the_list_syntax(tmp_path, sources):
    path = tmp_path / "r.yaml"
    path.write_text(f"op: linear\nsources: {sources}\n")
    raw = sources if sources != "5" else 5
    with pytest.raises(VlmergeError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}.sources must be a list of strings, got {raw!r}; write it as sources: [target, DONOR, ...]"
    )


def test_sources_from_a_mapping_is_refused():
    with pytest.raises(VlmergeError, match=r"recipe.sources must be a list of strings, got \{'target': 1\}"):
        Recipe.from_dict({"op": "linear", "sources": {"target": 1}})
