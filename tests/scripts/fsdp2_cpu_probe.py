"""Does torch's FSDP2 itself run on CPU with gloo? (docs/troubleshooting.md, "Sharded engines on CPU")

    torchrun --nproc_per_node 2 tests/scripts/fsdp2_cpu_probe.py

Shards a tiny Llama with `fully_shard` on a CPU device mesh, takes an AdamW step, gathers the full state dict and
generates. Prints one line per rank. On torch 2.13 (CPU build) all of it runs: what keeps FSDP off these machines
is accelerate, which turns FSDP on only for GPU-like distributed types.
"""

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = type(model.model.layers[0].mlp.up_proj.weight).__name__  # DTensor: this rank holds a shard
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, 64, (2, 8))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    optimizer.step()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with torch.no_grad():
        generated = model.generate(
            ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=3, do_sample=False
        )
    print(
        f"rank {dist.get_rank()}: loss {loss.item():.4f}, weights are {sharded}, "
        f"full state dict {len(state)} tensors (rank 0 only), generated {tuple(generated.shape)}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
