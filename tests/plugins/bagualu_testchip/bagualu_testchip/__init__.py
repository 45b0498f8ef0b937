"""A fake accelerator plug-in for BaGuaLu: the CPU under another name, with its own rms_norm kernel.

It exists to prove that an out-of-tree chip is discovered through the ``bagualu.platforms`` entry
point, selected with ``BAGUALU_PLATFORM=testchip``, and that its kernels are really called.
"""
