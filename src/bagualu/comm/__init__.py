"""Communication: the device mesh (the only place process groups are made) and collectives."""

from bagualu.comm.all_to_all import all_to_all
from bagualu.comm.mesh import Axis, Mesh, make_mesh

__all__ = ["Axis", "Mesh", "make_mesh", "all_to_all"]
