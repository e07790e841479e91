"""Maps the repository's top-level folders into the ``litplug`` namespace.

``core/``, ``plugins/`` and ``callbacks/`` install as ``litplug.core``, ``litplug.plugins`` and
``litplug.callbacks``, so nothing generic such as ``core`` lands at the top of site-packages. All
other metadata lives in pyproject.toml; this file only computes the package list, which pyproject's
static ``packages.find`` cannot rename.
"""

from setuptools import find_packages, setup

ROOTS = ("core", "plugins", "callbacks")

packages = [f"litplug.{root}" for root in ROOTS]
packages += [f"litplug.{root}.{sub}" for root in ROOTS for sub in find_packages(root)]

setup(
    packages=packages,
    package_dir={f"litplug.{root}": root for root in ROOTS},
    package_data={
        # py.typed (PEP 561): a third-party plugin package's mypy checks against litplug's types
        "litplug.core": ["py.typed"],
        "litplug.plugins": ["py.typed", "*/README.md", "ghost_bn/kernel.c"],
        "litplug.callbacks": ["py.typed", "*/README.md"],
    },
)
