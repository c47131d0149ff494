"""The package's public surface: `workbench.<name>` for the notebook user."""

import subprocess
import sys

import pytest

import workbench as wb


@pytest.mark.parametrize("name", sorted(wb.__all__))
def test_every_export_resolves_to_a_workbench_object(name):
    """Eager and lazily loaded names alike: each is defined by the package and listed by ``dir``."""
    value = getattr(wb, name)
    assert isinstance(value, str) or value.__module__.startswith("workbench."), (name, value)
    assert name in dir(wb)


def test_analyze_norms_is_top_level_and_import_stays_light():
    code = "import sys, workbench as wb; heavy = [m for m in ('matplotlib', 'sklearn') if m in sys.modules]; " \
           "print(heavy); assert callable(wb.analyze_norms)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        wb.no_such_thing  # noqa: B018
