"""Image sources turned into a :class:`Manifest`: ids, paths, labels, splits and the images' fingerprint.

- :mod:`~featx.data.manifest`: the manifest and its fingerprint;
- :mod:`~featx.data.sources`: folders, CSV files, archives, torchvision datasets, scikit-learn's digits;
- :mod:`~featx.data.archives`: unpacking archives safely, within size, count and ratio limits;
- :mod:`~featx.data.splits`: the test split carved when a source has none;
- :mod:`~featx.data.imageio`: decoding hostile images safely into model input.
"""

from featx.data.manifest import FINGERPRINT_MODES, IMAGE_EXTENSIONS, SPLITS, Manifest
from featx.data.sources import (
    from_archive,
    from_csv,
    from_digits,
    from_files,
    from_folder,
    from_torchvision,
    load_source,
)

__all__ = [
    "FINGERPRINT_MODES",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Manifest",
    "from_archive",
    "from_csv",
    "from_digits",
    "from_files",
    "from_folder",
    "from_torchvision",
    "load_source",
]
