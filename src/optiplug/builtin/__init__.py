"""The default plugin: AdamW, the torch.optim classics and transformers' schedulers.

It is always loaded, first, and registers through the same hooks as any third-party plugin: the
registry imports its modules by path (``optiplug.plugins.DEFAULT_PLUGIN_MODULES``). Each module
names its default entry in ``DEFAULT``. Their config classes are in one module, :data:`CONFIGS`, built when a
config is first read (not by ``optiplug list``); each module still gives its own by their old names.
"""

from __future__ import annotations

from optiplug.entries import LazyConfig

CONFIGS = "optiplug.builtin.configs"
"""The module of the default plugin's config classes."""


def lazy_config(name: str, cls: str) -> LazyConfig:
    """Entry ``name``'s config, the class ``cls`` of :data:`CONFIGS`, imported when the entry's config is first read."""
    return LazyConfig.from_module(name, f"{CONFIGS}:{cls}")
