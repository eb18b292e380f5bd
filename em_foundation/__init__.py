"""Are vision foundation models foundational for EM segmentation? The workflow's science.

Importing the package is cheap on purpose: the Snakefile imports it to validate the
config, and a dry-run of the whole grid must stay fast, so torch is only imported by the
modules that need it.
"""

__version__ = "0.1.0"
