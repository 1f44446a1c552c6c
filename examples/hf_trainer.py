"""NeFT in your own Hugging Face Trainer script: score neurons, train only them, save, reload.

python examples/hf_trainer.py                          # the tiny model built in code: seconds on a CPU
python examples/hf_trainer.py --resume --steps 12      # continue from the last save_steps checkpoint
python examples/hf_trainer.py --model Qwen/Qwen2.5-0.5B --budget paper_9 --steps 500   # a real model
"""

import argparse
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from neft_lab import NeuronConfig, NeuronModel, get_neuron_model, gradient_neuron_scores, select_neurons
from neft_lab.data.embedded import sentence_pair  # English→French pairs generated in code

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny", help="'tiny' or a Hugging Face name/folder")
share_or_point = lambda v: v if v.startswith("paper_") else float(v)  # noqa: E731
parser.add_argument("--budget", default=0.05, type=share_or_point, help="share of all parameters or paper_9")
parser.add_argument("--impl", default="fused", choices=["fused", "delta"])
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--out", default="outputs/examples/hf_trainer")
parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
args = parser.parse_args()


def load_base():
    if args.model == "tiny":
        from neft_lab.models.tiny import build_tiny_model

        return build_tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)  # frozen weights in bf16
    return model, AutoTokenizer.from_pretrained(args.model)


model, tokenizer = load_base()
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def example(english, french):  # the loss is on the French only
    prompt = tokenizer(f"English: {english}\nFrench:")["input_ids"]
    target = tokenizer(f" {french}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    fill = lambda key, value: torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])  # noqa: E731
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": fill("input_ids", pad), "attention_mask": mask, "labels": fill("labels", -100)}


data = [example(*sentence_pair(rng)) for rng in [random.Random(0)] for _ in range(512)]

# 1. Which vectors: the loss gradient on a few batches (or score_neurons(base, tuned): the paper's cosine).
scores = gradient_neuron_scores(model, [collate(data[i : i + 8]) for i in range(0, 64, 8)])
neurons = select_neurons(scores, budget=args.budget)
# 2. Only those vectors train (float32 masters, whatever the model's dtype).
model = get_neuron_model(model, NeuronConfig(neurons=neurons, impl=args.impl))
model.print_trainable_parameters()
# 3. Any Trainer setup: gradient checkpointing, bf16 autocast, checkpoints every save_steps, resume.
training = TrainingArguments(
    args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3 if args.model == "tiny" else 2e-5,
    gradient_checkpointing=True, bf16=True, use_cpu=not torch.cuda.is_available(), save_steps=4, logging_steps=4,
    report_to=[], remove_unused_columns=False, disable_tqdm=True,
)  # fmt: skip
trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collate)
trainer.train(resume_from_checkpoint=args.resume or None)
print(f"trained to step {trainer.state.global_step}")
# 4. The adapter: the selected vectors, their indices, the config and the base model's hash.
model.save_pretrained(f"{args.out}/adapter")
reloaded = NeuronModel.from_pretrained(load_base()[0], f"{args.out}/adapter").to(model.device)
batch = {key: value.to(model.device) for key, value in collate(data[:4]).items()}
with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16):
    same = torch.equal(model.eval()(**batch).logits, reloaded(**batch).logits)
print(f"the reloaded adapter reproduces the trained model: {same}")
merged = reloaded.merge_and_unload()  # a plain model: merged.save_pretrained(...) writes a normal checkpoint
