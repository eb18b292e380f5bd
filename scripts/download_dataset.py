"""Snakemake `script:` of the download_dataset rule: fetch one archive and verify its sha256.

Everything it prints (progress bar, the unverified-checksum warning, a traceback) goes to
the rule's log file, which Snakemake names when the job fails; warnings (an unverified
checksum, a retried download) reach the console too.
"""

import logging
import sys
from pathlib import Path

from em_foundation.data.download import download
from em_foundation.scripting import logged, warnings_to_console

with logged(snakemake.log[0]):  # noqa: F821 (snakemake is injected by Snakemake)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    warnings_to_console()
    name = snakemake.wildcards.dataset  # noqa: F821
    download(
        snakemake.params.url,
        snakemake.params.sha256,
        Path(snakemake.output[0]),  # noqa: F821
        config_keys=f"datasets.{name}.url / datasets.{name}.sha256",
    )
