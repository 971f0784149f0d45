"""The public API: every name re-exported from ``neurosem`` resolves, lazily."""
import subprocess
import sys

import neurosem


def test_every_public_name_resolves_to_the_same_non_module_object():
    import types

    for name in neurosem.__all__:
        first = getattr(neurosem, name)
        assert not isinstance(first, types.ModuleType), name
        assert getattr(neurosem, name) is first, name


def test_import_is_light():
    code = "import sys, neurosem; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
