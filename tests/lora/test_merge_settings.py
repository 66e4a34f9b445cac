"""``lora merge`` settings: each method takes only its options, refused by name in one line, in a fixed order."""

from __future__ import annotations

import pytest

from modelfuse.errors import RecipeError
from modelfuse.lora.settings import TAKES, LoraMergeSettings


def test_each_method_takes_its_options() -> None:
    assert LoraMergeSettings.of(method="ties", weights=[1.0, 0.5], rank=4, density=0.3).density == 0.3
    assert LoraMergeSettings.of(method="dare", seed=3).seed == 3
    assert LoraMergeSettings.of(method="mwa", losses=[0.9, 0.7], penalty=2.0).losses == (0.9, 0.7)
    assert LoraMergeSettings.of(method="rmm", basis=2).basis == 2
    assert LoraMergeSettings.of(method="cat") == LoraMergeSettings()
    assert set(TAKES) == {"cat", "linear", "svd", "ties", "dare", "lego", "mwa", "rmm"}


@pytest.mark.parametrize(("given", "message"), [
    ({"method": "rmm", "weights": [1.0], "density": 0.3},
     "--weight, --density: not used by --method rmm; leave them out"),
    ({"method": "lego", "weights": [1.0]}, "--weight: not used by --method lego; leave it out"),
    ({"method": "cat", "seed": 1}, "--seed: not used by --method cat; leave it out"),
    ({"method": "mean"}, "--method 'mean': use one of cat, linear, svd, ties, dare, lego, mwa, rmm"),
])
def test_what_a_method_does_not_use_is_refused(given: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        LoraMergeSettings.of(**given)
    assert str(caught.value) == message
