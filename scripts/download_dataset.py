"""Snakemake `script:` of the download_dataset rule: fetch one archive and verify its sha256.

Everything it prints (progress bar, the unverified-checksum warning, a traceback) goes to
the rule's log file, which Snakemake names when the job fails.
"""
import logging
import sys
from pathlib import Path

from em_foundation.data.download import download

sm = snakemake  # noqa: F821 (injected by Snakemake)
sys.stdout = sys.stderr = open(sm.log[0], "w", buffering=1)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
name = getattr(sm.wildcards, "dataset", "<name>")
download(sm.params.url, sm.params.sha256, Path(sm.output[0]),
         config_keys=f"datasets.{name}.url / datasets.{name}.sha256")
