"""``python -m napari_segtool.cli``: the ``napari-segtool`` command."""

import sys

from napari_segtool.cli import main

sys.exit(main())
