"""The training system (FastMoE side): data preparation, sampling; the loop and recipes follow."""
