"""Attention kernels: the mask rule from token metadata and the backends behind `attention`."""
