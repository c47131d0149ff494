import pytest

import workbench as wb


def test_a_layer_selection_is_validated_where_it_is_resolved(tiny):
    """Every layer list goes through ``hook_names``; a repeated layer failed later as a zip() error."""
    assert tiny.hook_names([2, 0]) == ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post"]
    assert tiny.hook_names(None, "hook_mlp_out") == [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    with pytest.raises(wb.InputError, match=r"layer\(s\) \[0\] given more than once in \[0, 1, 0\]"):
        tiny.hook_names([0, 1, 0])
    for bad in ("1", 1.0, True):
        with pytest.raises(wb.InputError, match="a layer is an integer index"):
            tiny.hook_names([bad])
    for bad in (2, "0,1"):
        with pytest.raises(wb.InputError, match="list of layer indices"):
            tiny.hook_names(bad)
    with pytest.raises(wb.InputError, match="out of range"):
        tiny.hook_names([3])
