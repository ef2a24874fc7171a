"""What a layer is for, recorded in its metadata so pickers can choose by role, not by order.

The plugin marks the layers it makes (and the reference of its sample data) with
``metadata[ROLE_KEY]``; the widgets pick their defaults from these marks. Pure constants: no
napari import, so sample-data contributions can use them too.
"""

from __future__ import annotations

ROLE_KEY = "segtool_role"
IMAGE = "image"
PREDICTION = "prediction"  # labels made by Segment: what the user corrects
UNCERTAINTY = "uncertainty"  # per-voxel uncertainty in [0, 1], for the Queue
REFERENCE = "reference"  # labels to compare against; never written by the plugin
ROLES = (IMAGE, PREDICTION, UNCERTAINTY, REFERENCE)
