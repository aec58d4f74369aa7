"""The KV connector that hands vLLM's captured hidden states to the rollout in-process (imported by vLLM).

vLLM's stock `extract_hidden_states` method writes the chosen layers' hidden states into a cache-only KV
layer; its `ExampleHiddenStatesConnector` copies them out when a request finishes and saves them to a
safetensors file. We keep all of its scheduler side (which blocks to read, delaying their release) and
replace the save: the gathered tensor stays in this process, in `CAPTURED`, keyed by the path vLLM reports
in the request's `kv_transfer_params`. The engine core runs in the rollout's process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so no tensor is pickled, written or sent anywhere.
"""

from __future__ import annotations

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    ExampleHiddenStatesConnectorMetadata,
    extract_from_kv_cache,
)

CAPTURED: dict[str, torch.Tensor] = {}
"""hidden_states_path -> (T, layers, H) on vLLM's device, in the sorted order of the captured layer ids."""


class InProcessHiddenStates(ExampleHiddenStatesConnector):
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Gather each finished request's rows from the cache-only layer; its blocks are free after this."""
        done = set()
        metadata = self._get_connector_metadata() if self.has_connector_metadata() else None
        if isinstance(metadata, ExampleHiddenStatesConnectorMetadata):
            for pending in metadata.pending_saves:
                blocks = torch.tensor(pending.block_ids, dtype=torch.long)
                slots = (blocks[:, None] * self._block_size + torch.arange(self._block_size)).flatten()
                # Fancy indexing copies: the tensor outlives the blocks it came from.
                CAPTURED[pending.filename] = extract_from_kv_cache(
                    self._kv_cache, slots.to(self._kv_cache.device), len(pending.token_ids)
                )
                done.add(pending.req_id)
        return done or None, None
