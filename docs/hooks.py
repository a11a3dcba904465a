"""MkDocs hook: serve the repository's benchmark figures and notebooks as site files.

The figures (`benchmarks/results/`) and the notebooks (`notebooks/`) live at the
repository root, outside `docs/`, where the README, the tests and the benchmarks
expect them. This hook adds them to the site's files under the same paths, so a
page links `benchmarks/results/x.png` or `notebooks/01_quickstart.ipynb`
relative to the docs root, and nothing is copied into `docs/`.
"""

import pathlib

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVED = {"benchmarks/results": "**/*.png", "notebooks": "*.ipynb"}


# Before mkdocs-jupyter's on_files, which turns the notebooks into pages.
@event_priority(100)
def on_files(files, config):
    for folder, pattern in SERVED.items():
        for path in sorted((ROOT / folder).glob(pattern)):
            files.append(File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files
