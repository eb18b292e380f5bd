"""Snakemake `script:` of the fetch_weights localrule (login node, online).

Downloads the backbone's pretrained weights into hub.cache_dir (pinned to `revision` when
given), enters it in the cache's manifest.json and writes the marker JSON: model, resolved
commit, files and their sha256.
`weights: random` or a local file downloads nothing; the marker records that.
"""

import json

from em_foundation.backbones.hub import fetch_weights
from em_foundation.io import write_json
from em_foundation.scripting import logged

with logged(snakemake.log[0]):  # noqa: F821 (snakemake is injected by Snakemake)
    backbone = snakemake.wildcards.backbone  # noqa: F821
    record = fetch_weights(dict(snakemake.params.backbone), snakemake.params.hub["cache_dir"], backbone)  # noqa: F821
    record["backbone"] = backbone
    write_json(snakemake.output[0], record)  # noqa: F821
    print(json.dumps(record, indent=2, sort_keys=True))
