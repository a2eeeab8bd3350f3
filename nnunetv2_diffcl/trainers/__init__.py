"""The plugin's trainers. ``PLUGIN_TRAINERS`` is the one list nnU-Net's lookup and ``doctor`` use."""

PLUGIN_TRAINERS: list = []
