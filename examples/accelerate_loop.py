"""NeFT in your own accelerate training loop: score neurons, train only them, save the adapter, reload it.

python examples/accelerate_loop.py                       # the tiny model built in code: seconds on a CPU
accelerate launch --num_processes 2 examples/accelerate_loop.py --model Qwen/Qwen2.5-0.5B --steps 200  # DDP
"""

import argparse
import random

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from neft_lab import NeuronConfig, NeuronModel, get_neuron_model, gradient_neuron_scores, select_neurons
from neft_lab.data.embedded import sentence_pair  # English→French pairs generated in code

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny", help="'tiny' or a Hugging Face name/folder")
parser.add_argument("--budget", default=0.05, type=float, help="share of all parameters that trains")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--out", default="outputs/examples/accelerate_loop")
args = parser.parse_args()
accelerator = Accelerator(mixed_precision="bf16", cpu=not torch.cuda.is_available())


def load_base():
    if args.model == "tiny":
        from neft_lab.models.tiny import build_tiny_model

        return build_tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)  # frozen weights in bf16
    return model, AutoTokenizer.from_pretrained(args.model)


model, tokenizer = load_base()
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(pairs):  # the loss is on the French only
    rows = []
    for english, french in pairs:
        prompt = tokenizer(f"English: {english}\nFrench:")["input_ids"]
        target = tokenizer(f" {french}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    pad_to = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad_to(ids, pad) for ids, _ in rows]),
        "attention_mask": torch.tensor([pad_to([1] * len(ids), 0) for ids, _ in rows]),
        "labels": torch.tensor([pad_to(labels, -100) for _, labels in rows]),
    }


rng = random.Random(0)
data = DataLoader([sentence_pair(rng) for _ in range(512)], batch_size=8, shuffle=True, collate_fn=collate)
scores = gradient_neuron_scores(model, [collate([sentence_pair(rng) for _ in range(8)]) for _ in range(8)])
model = get_neuron_model(model, NeuronConfig(neurons=select_neurons(scores, budget=args.budget)))
model.print_trainable_parameters()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model, optimizer, data = accelerator.prepare(model, optimizer, data)  # DDP, devices, bf16 autocast
model.train()
for _, batch in zip(range(args.steps), data):
    loss = model(**batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
accelerator.print(f"trained {args.steps} steps, last loss {loss.item():.3f}")
if accelerator.is_main_process:
    trained = accelerator.unwrap_model(model)
    trained.save_pretrained(f"{args.out}/adapter")  # the vectors, their indices, the base model's hash
    reloaded = NeuronModel.from_pretrained(load_base()[0], f"{args.out}/adapter").to(trained.device)
    batch = {k: v.to(trained.device) for k, v in collate([sentence_pair(rng) for _ in range(4)]).items()}
    with torch.no_grad(), accelerator.autocast():
        same = torch.equal(trained.eval()(**batch).logits, reloaded(**batch).logits)
    print(f"the reloaded adapter reproduces the trained model: {same}")
