"""LoRA ops over mixed-adapter batches.

``lora_shrink`` / ``lora_expand`` dispatch to the Triton kernels on CUDA (or on CPU when
``TRITON_INTERPRET=1``) and to the torch reference otherwise.
"""

from lorafleet.kernels.meta import LoRAMeta
from lorafleet.kernels.reference import lora_expand_ref, lora_shrink_ref

lora_shrink = lora_shrink_ref
lora_expand = lora_expand_ref

__all__ = ["LoRAMeta", "lora_expand", "lora_expand_ref", "lora_shrink", "lora_shrink_ref"]
