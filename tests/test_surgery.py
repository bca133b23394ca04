"""speedup.surgery.replace_modules: the one in-place module-replacement walk."""

from __future__ import annotations

import torch
from torch import nn

from speedup.surgery import replace_modules


def _relu_to_gelu(child: nn.Module) -> nn.Module | None:
    return nn.GELU() if isinstance(child, nn.ReLU) else None


def test_replaces_matching_children_and_returns_their_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    names = replace_modules(model, _relu_to_gelu)
    assert names == ["1", "3"]
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU]


def test_no_match_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    before = list(model)
    assert replace_modules(model, _relu_to_gelu) == []
    assert list(model) == before


def test_nested_modules_get_qualified_names_in_walk_order():
    inner = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model = nn.Sequential(nn.ReLU(), nn.Sequential(inner, nn.ReLU()))
    names = replace_modules(model, _relu_to_gelu)
    # parents in model order; a parent's own children before its submodules' children
    assert names == ["0", "1.1", "1.0.1"]
    assert isinstance(model[1][0][1], nn.GELU) and isinstance(model[1][1], nn.GELU)


def test_parameters_of_kept_modules_are_untouched_and_keys_stable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    weight = model[0].weight
    keys = list(model.state_dict())
    replace_modules(model, _relu_to_gelu)
    assert model[0].weight is weight
    assert list(model.state_dict()) == keys


def test_shared_module_is_built_once_and_replaced_under_every_name():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    calls = []

    def build(child: nn.Module) -> nn.Module | None:
        calls.append(child)
        return _relu_to_gelu(child)

    names = replace_modules(model, build)
    assert names == ["0.0"]  # one entry per distinct module, under its first name
    assert model[0][0] is model[1][0] and isinstance(model[0][0], nn.GELU)
    assert sum(c is shared for c in calls) == 1


def test_replacements_are_not_visited_and_root_is_never_replaced():
    model = nn.Sequential(nn.ReLU())

    def wrap(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.ReLU):
            return nn.Sequential(child)  # would recurse forever if the walk revisited it
        return nn.Identity()  # never reached for the root

    assert replace_modules(model, wrap) == ["0"]
    assert isinstance(model, nn.Sequential) and isinstance(model[0][0], nn.ReLU)


def test_skip_children_of_keeps_already_wrapped_layers():
    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    model = nn.Sequential(Wrapped(nn.ReLU()), nn.ReLU())
    names = replace_modules(model, _relu_to_gelu, skip_children_of=Wrapped)
    assert names == ["1"]
    assert isinstance(model[0].inner, nn.ReLU) and isinstance(model[1], nn.GELU)
