"""The folder that ``nnUNet_extTrainer`` points to.

nnU-Net imports every module in this folder as a top-level module while it looks for a trainer, so
it holds only small re-export modules with unique names.
"""
