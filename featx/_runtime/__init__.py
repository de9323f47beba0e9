"""Machinery every stage shares: devices, the torchrun layer, environment, atomic writes, the allocator.

Nothing here imports a featx stage; every stage may import from here.
"""
