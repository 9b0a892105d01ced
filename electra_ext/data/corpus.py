"""The public-domain English corpus shipped in the package (electra_ext/data/assets/corpus): the World English
Bible and Jane Austen's six novels, xz-compressed, one line per verse or paragraph, a blank line between
documents (chapters). MANIFEST.json records each file's provenance and SHA-256, checked at load so a
corrupted installation is reported instead of trained on. scripts/regenerate_corpus.py rebuilds the files
from their Debian packages."""
import json
import os
from typing import List

from electra_ext.data.sources import file_sha256

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "corpus")
MANIFEST = os.path.join(CORPUS_DIR, "MANIFEST.json")


def embedded_corpus_manifest() -> List[dict]:
    with open(MANIFEST) as f:
        return json.load(f)["files"]


def embedded_corpus_files() -> List[str]:
    """Paths of the embedded corpus files, each checked against its recorded SHA-256."""
    paths = []
    for entry in embedded_corpus_manifest():
        path = os.path.join(CORPUS_DIR, entry["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embedded corpus file {path} is missing: reinstall electra_ext")
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise ValueError(f"embedded corpus file {path} has SHA-256 {actual}, MANIFEST.json records "
                             f"{entry['sha256']}: the installation is corrupted, reinstall electra_ext")
        paths.append(path)
    return paths
