"""Adapters: the ``AdapterManager`` (disk -> host-memory LRU -> device slots), the PEFT
folder reader and validator (safetensors only), and the hub lookup of adapter ids.

May import: ``model``, ``kernels``, the producer's wire types.
"""
