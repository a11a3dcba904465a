"""Check that the API reference publishes every public name of `keras_unitscale`.

Run after `mkdocs build --strict`: reads `__all__` of `keras_unitscale` and of
each public module it exports (statically, without importing the package, so
the docs environment needs no backend) and looks each `module.name` up in the
inventory mkdocstrings writes (`site/objects.inv`). Exits non-zero, naming what
is missing.

    python docs/check_api.py [SITE_DIR]
"""

import ast
import pathlib
import sys
import zlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "keras_unitscale"


def module_file(module):
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def public_names(module):
    """`module.__all__`, read from its source."""
    tree = ast.parse(module_file(module).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"{module} has no __all__")


def inventory(site):
    """The object names in mkdocstrings' Sphinx-style inventory."""
    data = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    lines = zlib.decompress(data[header_end:]).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines if line}


def expected():
    """Every public `module.name`: the package's names and those of the modules it exports."""
    names = []
    for name in public_names(PACKAGE):
        names.append(f"{PACKAGE}.{name}")
        if module_file(f"{PACKAGE}.{name}").exists():
            names += [f"{PACKAGE}.{name}.{member}" for member in public_names(f"{PACKAGE}.{name}")]
    return names


def main(argv):
    site = pathlib.Path(argv[1]) if len(argv) > 1 else ROOT / "site"
    published = inventory(site)
    names = expected()
    missing = [name for name in names if name not in published]
    if missing:
        print(f"{len(missing)} public names are missing from the API reference ({site}):")
        print("\n".join(f"  {name}" for name in missing))
        return 1
    print(f"API reference: all {len(names)} public names of {PACKAGE} are published.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
