"""Datasets: generation or download, conversion to the prepared HDF5, tiling, splits.

Converters are looked up in ``em_foundation.data.registry``; this package's ``__init__``
imports nothing, so reading a prepared file does not load every converter.
"""
