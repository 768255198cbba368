"""The default plugin: AdamW, the torch.optim classics and transformers' schedulers.

It is always loaded, first, and registers through the same hooks as any third-party plugin: the
registry imports its modules by path (``optiplug.plugins.DEFAULT_PLUGIN_MODULES``). Each module
names its default entry in ``DEFAULT``.
"""
