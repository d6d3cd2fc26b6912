"""The run folder: its layout and file names (``layout``), the records of each class and the whole run
(``records.Store``), crash-safe files and locks (``files``), the images and the preview (``images``), and how two
runs' identities differ (``identity``)."""
from .files import atomic_write_bytes, new_file, write_files
from .images import to_uint8
from .layout import MANIFEST, PREVIEW
from .records import Store

__all__ = ["MANIFEST", "PREVIEW", "Store", "atomic_write_bytes", "new_file", "to_uint8", "write_files"]
