"""Diff-CL semi-supervised segmentation as an nnU-Net v2 plugin.

Kept free of heavy imports: a startup hook imports this package in every Python process of the
environment it is installed in.
"""

__version__ = "0.1.0"
