"""The wheel installs the components under the moejax namespace and ships the default model."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, timeout=300)
    [wheel] = tmp_path.glob("moejax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"moejax", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for pkg in ("passes", "sharding", "pallas_kernels", "models"):
        assert f"moejax/{pkg}/__init__.py" in names
    assert "moejax/models/default/model.safetensors" in names and "moejax/models/default/heldout.txt" in names


def test_component_packages_import_under_moejax():
    import moejax.models
    import moejax.pallas_kernels
    import moejax.passes
    import moejax.sharding

    for mod in (moejax.passes, moejax.sharding, moejax.pallas_kernels, moejax.models):
        assert mod.__name__.startswith("moejax.")
