"""Desktop images (DIs): building them from Debian packages and checking uploaded ones.

A QVD DI is a tarball of a root file system that carries ``/etc/qvd/image.toml``
(``format = "qvd-di-1"``); that file is what tells our images from foreign tarballs.
"""

from __future__ import annotations

from qvd.images.build import PROFILES, build_image, default_cache_dir
from qvd.images.validate import DiMetadata, inspect_di_tarball

__all__ = ["PROFILES", "DiMetadata", "build_image", "default_cache_dir", "inspect_di_tarball"]
