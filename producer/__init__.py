"""Producer side of lorafleet: wire types, codec and clients. Never imports torch."""

from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.types import CompletionOutput, LoRARequest, RequestOutput, SamplingParams

__all__ = [
    "CompletionOutput",
    "LoRARequest",
    "LoraFleetError",
    "RequestOutput",
    "SamplingParams",
]
