"""The vLLM attention backend that stores K/V in sawquant's pages and runs sawquant's attention.

Each layer's KV cache is one vLLM tensor of opaque byte blocks (``[num_blocks, 1, block_size,
bytes_per_token]`` uint8, sized by the plugin's per-layer spec); :class:`BlockLayout` carves
sawquant's pools out of it, so the same write and attention as everywhere else (the Triton
kernels on CUDA tensors, the torch twins otherwise, through ``runtime.dispatch``) serve vLLM's
block table and slots directly.

Every attention reads the pages, the step's own tokens included (written by
``do_kv_cache_update`` first): a prompt chunk attends to the quantized K/V of earlier chunks and
of itself, as a decode step does. So the result is the same whether a prefix came from vLLM's
prefix cache, another chunking, or a recompute after preemption, and each request is computed on
its own (decode through the batch-invariant twin, prefill one request at a time): greedy output
does not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from sawquant.runtime import dispatch
from sawquant.runtime.vllm.state import ServingState, layer_index, serving_state

__all__ = ["SawquantAttentionBackend", "SawquantAttentionImpl", "SawquantMetadata"]


@dataclass
class SawquantMetadata:
    """What the impl needs of one step (vLLM's common metadata, host copies included)."""

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor  # [num_reqs] int32: cached + new tokens
    seq_lens_cpu: torch.Tensor
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    # The step's split, derived once here for every layer: one-token requests decode together;
    # every other request is a prompt chunk (request, first token row, end row, seq_len).
    decode_rows: torch.Tensor | None  # [num_decode] token rows of the decode requests
    decode_table: torch.Tensor | None  # [num_decode, max_blocks] their block tables
    decode_lens: torch.Tensor | None  # [num_decode] their seq_lens
    chunks: list[tuple[int, int, int, int]]


class SawquantMetadataBuilder(AttentionMetadataBuilder[SawquantMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SawquantMetadata:
        cm = common_attn_metadata
        seq_lens_cpu = cm.seq_lens.cpu()
        starts, lens = cm.query_start_loc_cpu.tolist(), seq_lens_cpu.tolist()
        decode = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
        chunks = [(i, starts[i], starts[i + 1], lens[i]) for i in range(len(lens))
                  if starts[i + 1] - starts[i] > 1]  # fmt: skip
        rows = table = dlens = None
        if decode:
            device = cm.seq_lens.device
            idx = torch.tensor(decode, device=device)
            rows = torch.tensor([starts[i] for i in decode], device=device)
            table, dlens = cm.block_table_tensor[idx], cm.seq_lens[idx]
        return SawquantMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc,
            query_start_loc_cpu=cm.query_start_loc_cpu,
            seq_lens=cm.seq_lens,
            seq_lens_cpu=seq_lens_cpu,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            decode_rows=rows,
            decode_table=table,
            decode_lens=dlens,
            chunks=chunks,
        )


class SawquantAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SawquantAttentionImpl]:
        return SawquantAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SawquantMetadataBuilder]:
        return SawquantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]  # any power of two >= 16 is a sawquant page size

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(range(16, 257, 16))

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class SawquantAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        from vllm.config import get_current_vllm_config

        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "KV sharing between layers": kv_sharing_target_layer_name is not None,
            "attention sinks": sinks is not None,
            f"--kv-cache-dtype {kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        bad = [what for what, yes in unsupported.items() if yes]
        if bad:
            raise ValueError(
                f"sawquant: this model's attention uses {', '.join(bad)}, which the sawquant KV "
                "cache does not serve; serve the checkpoint without its sawquant config"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.softcap = logits_soft_cap if logits_soft_cap else None
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.state: ServingState = serving_state(get_current_vllm_config())
        self._views: dict[str, tuple[int, Any]] = {}  # layer name -> (buffer ptr, LayerKV)

    def _layer(self, layer: Any, kv_cache: torch.Tensor):
        """The LayerKV over this layer's vLLM buffer (built once per buffer)."""
        name = layer.layer_name
        hit = self._views.get(name)
        if hit is None or hit[0] != kv_cache.data_ptr():
            idx = layer_index(name)
            kv = self.state.layout(idx, kv_cache.shape[2]).layer_kv(
                kv_cache, self.state.local.layers[idx], self.state.local.model,
                values_folded=self.state.local.values_folded,
            )  # fmt: skip
            hit = (kv_cache.data_ptr(), kv)
            self._views[name] = hit
        return hit[1]

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        # key, value: [T, H_kv, D] new tokens; slot_mapping: [T] int64 (-1: padding)
        kv = self._layer(layer, kv_cache)
        n = slot_mapping.shape[0]
        idx = layer_index(layer.layer_name)
        if idx == 0:  # once per step: a value the previous step could not store is an error
            self.state.check_flag(key.device)
        dispatch.write_kv(kv, key[:n], value[:n], slot_mapping,
                          flag=self.state.flag(key.device), flag_value=idx + 1)  # fmt: skip
        self.state.calls["write"] += 1
        if idx in self.state.recording:
            self.state.recording[idx].append(
                (key[:n].cpu().clone(), value[:n].cpu().clone(), slot_mapping.cpu().clone())
            )

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        if attn_metadata is None:  # memory profiling run: no KV yet
            return output
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("sawquant: fused output quantization is not supported")
        kv = self._layer(layer, kv_cache)
        md: SawquantMetadata = attn_metadata
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out3 = output.view(output.shape[0], self.num_heads, -1)  # [T, H_q, D] (any layout)
        kw = dict(softmax_scale=self.scale, sliding_window=self.sliding_window,
                  softcap=self.softcap)  # fmt: skip
        if md.decode_rows is not None:
            rows = md.decode_rows
            out = dispatch.decode_attention(
                q[rows], kv, md.decode_table, md.decode_lens, **kw
            )  # [B, H_q, D]
            out3[rows] = out.to(output.dtype)
            self.state.calls["decode"] += rows.numel()
        for i, s, e, length in md.chunks:
            # The chunk's own K/V are read back from the pages with its prefix (as stored), so
            # it attends exactly as it would had it come from the prefix cache.
            table = md.block_table[i : i + 1]
            qc = q[s:e].transpose(0, 1)[None]  # [1, H_q, T, D]
            cached = torch.tensor([length - (e - s)], dtype=torch.int32, device=q.device)
            out = dispatch.prefill_attention_stored(qc, kv, table, cached, **kw)  # [1, H_q, T, D]
            out3[s:e] = out[0].transpose(0, 1).to(output.dtype)
            self.state.calls["prefill"] += 1
        return output
