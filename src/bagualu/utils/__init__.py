"""Leaf utilities: the typed registry of BAGUALU_* variables, logging, lazy imports."""
