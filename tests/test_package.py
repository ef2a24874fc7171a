import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, napari_segtool, napari_segtool.config, napari_segtool.errors;"
        "heavy = [m for m in ('torch', 'qtpy', 'napari', 'magicgui', 'PyQt5', 'PyQt6')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_is_set():
    import napari_segtool

    assert napari_segtool.__version__.count(".") >= 2
