import pytest

from lathe.config import load_recipe
from lathe.errors import LatheError


def test_builtin_recipes_load_and_overrides_apply():
    recipe = load_recipe("default", ["train.lr=1e-3", "model.n_layer=3", "generate.prompt='x = '"])
    assert recipe.train.lr == 1e-3 and recipe.model.n_layer == 3 and recipe.generate.prompt == "x = "
    assert load_recipe("tiny").model.n_embd == 32


def test_typo_names_the_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(LatheError) as err:
        load_recipe(path)
    assert "train.lerning_rate" in str(err.value) and "unknown field" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("override,field", [("train.lr=-1", "train.lr"), ("model.n_head=3", "model"),
                                            ("data.val_fraction=0.97", "data"), ("train.batch_size=zero", "train.batch_size")])
def test_out_of_range_values_are_clear_errors(override, field):
    with pytest.raises(LatheError, match=f"field '{field}"):
        load_recipe("tiny", [override])


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(LatheError, match="not found"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(LatheError, match="not valid YAML"):
        load_recipe(bad)
