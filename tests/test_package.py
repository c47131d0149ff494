"""The package's public surface: `workbench.<name>` for the notebook user."""

import subprocess
import sys

import pytest

import workbench as wb


@pytest.mark.parametrize("name", sorted(wb._LAZY))
def test_lazy_exports_resolve_to_their_module_objects(name):
    import importlib

    module = importlib.import_module(f"workbench.{wb._LAZY[name]}")
    assert getattr(wb, name) is getattr(module, name)
    assert name in wb.__all__


def test_analyze_norms_is_top_level_and_import_stays_light():
    code = "import sys, workbench as wb; heavy = [m for m in ('matplotlib', 'sklearn') if m in sys.modules]; " \
           "print(heavy); assert callable(wb.analyze_norms)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        wb.no_such_thing  # noqa: B018
