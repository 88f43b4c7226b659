"""Data helpers of the experiments: DataError, the data folder, the processed-data cache
(cache.py), downloads (download.py), image datasets (images.py) and padded series (series.py)."""
from .cache import DataError, cached, data_dir, file_digest

__all__ = ["DataError", "cached", "data_dir", "file_digest"]
