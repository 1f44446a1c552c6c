"""NeFT with TRL's SFTTrainer, the paper's way: a short full fine-tune as the reference, the vectors it moved most
(lowest cosine to the base) selected, then only those trained.

    python examples/trl_sft.py                                   # the tiny model built in code: seconds on a CPU
    python examples/trl_sft.py --model Qwen/Qwen2.5-0.5B --budget paper_9 --reference-steps 200 --steps 500
"""

import argparse
import copy
import random

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from neft_lab import NeuronConfig, NeuronModel, get_neuron_model, score_neurons, select_neurons
from neft_lab.data.embedded import sentence_pair  # English→French pairs generated in code

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny", help="'tiny' or a Hugging Face name/folder")
share_or_point = lambda v: v if v.startswith("paper_") else float(v)  # noqa: E731
parser.add_argument("--budget", default=0.05, type=share_or_point, help="share of all parameters or paper_9")
parser.add_argument("--reference-steps", type=int, default=8, help="the full fine-tune the scores come from")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--out", default="outputs/examples/trl_sft")
args = parser.parse_args()
tiny = args.model == "tiny"


def load_base():
    if tiny:
        from neft_lab.models.tiny import build_tiny_model

        return build_tiny_model("llama")
    return AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32
    ), AutoTokenizer.from_pretrained(args.model)


model, tokenizer = load_base()
rng = random.Random(0)
pairs = [sentence_pair(rng) for _ in range(512)]
data = Dataset.from_list([{"prompt": f"English: {en}\nFrench:", "completion": f" {fr}"} for en, fr in pairs])


def sft(model, out, steps, lr):
    config = SFTConfig(
        out, max_steps=steps, per_device_train_batch_size=8, learning_rate=lr, gradient_checkpointing=True,
        bf16=True, use_cpu=not torch.cuda.is_available(), logging_steps=4, save_strategy="no", report_to=[],
        disable_tqdm=True,
    )  # fmt: skip
    SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer).train()


# 1. The reference: a short full fine-tune of a copy (the paper's Llama-2 reference: 3,200 steps).
reference = copy.deepcopy(model)
sft(reference, f"{args.out}/reference", args.reference_steps, 1e-3 if tiny else 2e-5)
# 2. Scores: the cosine of each up row / down column between base and reference; keep the most moved.
scores = score_neurons(model, reference)  # or two safetensors folders, read one matrix at a time
del reference
neurons = select_neurons(scores, budget=args.budget)
# 3. Train only those vectors (float32 masters; bf16 autocast).
model = get_neuron_model(model, NeuronConfig(neurons=neurons))
model.print_trainable_parameters()
sft(model, args.out, args.steps, 1e-3 if tiny else 2e-5)
model.save_pretrained(f"{args.out}/adapter")
# 4. Later, anywhere: the base model + the adapter (another base is refused).
reloaded = NeuronModel.from_pretrained(load_base()[0], f"{args.out}/adapter")
prompt = tokenizer(f"English: {pairs[0][0]}\nFrench:", return_tensors="pt")
output = reloaded.generate(**prompt, max_new_tokens=16, do_sample=False)
print("generated:", tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True))
print(f"selected {neurons.num_vectors} vectors with the lowest cosine; adapter in {args.out}/adapter")
