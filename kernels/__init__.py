"""LoRA ops over mixed-adapter batches.

``lora_shrink`` / ``lora_expand`` (and the ``*_slices`` forms for fused projections, and
``add_lora_slices``, both in one call, as a LoRA linear uses them) run the
Triton kernels on CUDA tensors, the torch reference on CPU tensors, and the real kernels in
Triton's interpreter on CPU when ``TRITON_INTERPRET=1`` (read per call). Importing this
package does not import ``triton``; without it every op runs the reference.
"""

from lorafleet.kernels.backend import interpret_requested, triton_available, use_triton
from lorafleet.kernels.dispatch import (
    add_lora_slices,
    lora_expand,
    lora_expand_slices,
    lora_shrink,
    lora_shrink_slices,
)
from lorafleet.kernels.meta import LoRAMeta
from lorafleet.kernels.reference import (
    lora_expand_ref,
    lora_expand_slices_ref,
    lora_shrink_ref,
    lora_shrink_slices_ref,
)

__all__ = [
    "LoRAMeta",
    "add_lora_slices",
    "interpret_requested",
    "lora_expand",
    "lora_expand_ref",
    "lora_expand_slices",
    "lora_expand_slices_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "lora_shrink_slices",
    "lora_shrink_slices_ref",
    "triton_available",
    "use_triton",
]
