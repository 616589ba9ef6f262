"""One rank of the raw FSDP2 test (``torchrun``): LoRA on the builtin model, every decoder layer
and the root sharded with ``fully_shard``, two optimizer steps on this rank's batch, then the
full weights gathered (a collective) and saved by rank 0 with the stage saver. Rank 0 also
writes the gathered LoRA tensors to ``argv[1]/expected.pt`` for the test to compare."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.builtin.tiny import ensure_tiny_model
from alignkit.models import save_stage_model

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
path = ensure_tiny_model()
tokenizer = AutoTokenizer.from_pretrained(path)
model = get_peft_model(
    AutoModelForCausalLM.from_pretrained(path),
    LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
)
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert any(type(p).__name__ == "DTensor" for p in model.parameters())  # really sharded
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
torch.manual_seed(rank + 1)  # each rank its own batch, as data parallelism gives it
ids = torch.randint(3, tokenizer.vocab_size, (4, 16))
for _ in range(2):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    save_stage_model(model, tokenizer, out, state_dict=full)
    torch.save({k: v for k, v in full.items() if "lora_" in k}, out / "expected.pt")
dist.barrier()
dist.destroy_process_group()
