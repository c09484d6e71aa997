"""Producer side of lorafleet: wire types, codec and clients. Never imports torch."""

from lorafleet.producer.client import Client, JobHandle
from lorafleet.producer.errors import LoraFleetError
from lorafleet.producer.sync_client import SyncClient, SyncJobHandle
from lorafleet.producer.types import (
    ChatMessage,
    CompletionOutput,
    Logprob,
    LoRARequest,
    RequestOutput,
    SamplingParams,
)

__all__ = [
    "ChatMessage",
    "Client",
    "CompletionOutput",
    "JobHandle",
    "LoRARequest",
    "Logprob",
    "LoraFleetError",
    "RequestOutput",
    "SamplingParams",
    "SyncClient",
    "SyncJobHandle",
]
