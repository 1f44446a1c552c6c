"""The authors' evaluation protocol and LoRA as options (issue 18, §4, §6, §8): decoding with
`no_repeat_ngram_size`, newlines stripped instead of cut, their prompt without BOS/EOS around the training
pair, the whole test set in the paper presets, bf16 adapters, COMET on the training device, and the paper's
clipping norm under gradient checkpointing."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from neft_lab.config import compose
from neft_lab.data.encoding import PromptEncoder
from neft_lab.data.examples import Example
from neft_lab.data.task import Task
from neft_lab.errors import ConfigError
from neft_lab.evaluation import evaluate as evaluate_module
from neft_lab.evaluation import metrics as metrics_module
from neft_lab.evaluation.generate import finish_prediction, generate_predictions
from neft_lab.models.tiny import build_tiny_model
from neft_lab.strategies import StrategyContext
from neft_lab.strategies.lora import LoraStrategy

AUTHORS_ENZH = "Translate the following text from English to Chinese."


def _task(tmp_path, *overrides: str, task: str = "wmt_en_zh") -> Task:
    return Task.from_config(compose([f"task={task}", f"paths.run_dir={tmp_path}", *overrides]).task)


class RecordingModel(torch.nn.Module):
    """The tiny model, its `generate` keyword arguments recorded."""

    def __init__(self):
        super().__init__()
        self.inner, _ = build_tiny_model("llama")
        self.calls: list[dict] = []

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner.generate(**kwargs)


# ------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize(("setting", "passed"), [(4, 4), (0, None)])
def test_no_repeat_ngram_size_reaches_generate(tmp_path, setting, passed):
    _, tokenizer = build_tiny_model("llama")
    task = _task(tmp_path, f"task.no_repeat_ngram_size={setting}", "task.max_new_tokens=12")
    model = RecordingModel()
    generate_predictions(model, PromptEncoder(tokenizer, task), [Example("a b c", "x")], progress=False)
    assert model.calls[0].get("no_repeat_ngram_size") == passed


def test_no_repeat_ngram_size_blocks_repeated_ngrams(tmp_path):
    """With the authors' 4, no 4-gram repeats in what the (random) tiny model writes; without it, some do."""
    _, tokenizer = build_tiny_model("llama")

    def generated(size: int) -> list[int]:
        task = _task(tmp_path, f"task.no_repeat_ngram_size={size}", "task.max_new_tokens=200")
        model = RecordingModel()
        encoder = PromptEncoder(tokenizer, task)
        ids = encoder.encode_prompt(Example("a b c", "x"))
        out = model.inner.generate(
            input_ids=torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=200,
            min_new_tokens=200,
            **({"no_repeat_ngram_size": size} if size else {}),
        )
        return out[0, len(ids) :].tolist()

    def repeats(tokens: list[int]) -> bool:
        grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
        return len(grams) != len(set(grams))

    assert repeats(generated(0)) and not repeats(generated(4))


def test_newlines_cut_at_the_first_or_stripped_as_the_authors(tmp_path):
    text = " 第一行\n第二行 \n"
    cut = _task(tmp_path)
    strip = _task(tmp_path, "task.newlines=strip")
    assert (cut.newlines, strip.newlines) == ("cut", "strip")
    assert finish_prediction(text, cut) == "第一行"
    assert finish_prediction(text, strip) == "第一行第二行"  # infer.py: .replace('\n', '').strip()
    with pytest.raises(ConfigError, match="task.newlines"):
        _task(tmp_path, "task.newlines=keep")


def test_strip_generates_past_newlines(tmp_path):
    """Under `strip` a newline no longer ends generation (the authors stop at EOS or the token limit)."""
    _, tokenizer = build_tiny_model("llama")
    calls = {}
    for mode in ("cut", "strip"):
        model = RecordingModel()
        task = _task(tmp_path, f"task.newlines={mode}", "task.max_new_tokens=4")
        generate_predictions(model, PromptEncoder(tokenizer, task), [Example("a", "x")], progress=False)
        calls[mode] = model.calls[0].get("stop_strings")
    assert calls["cut"] == ["\n"] and not calls["strip"]


# ------------------------------------------------------------------------------------------------
# the authors' prompt


def test_authors_prompt_has_no_bos_or_eos_around_the_training_pair(tmp_path):
    _, tokenizer = build_tiny_model("llama")
    task = _task(tmp_path, "task.prompt_style=authors")
    encoder = PromptEncoder(tokenizer, task)
    example = Example("I like tea.", "我喜欢茶。")
    prompt_text = f"{AUTHORS_ENZH} I like tea."  # prompt + ' ' + input (infer/infer.py, data_process.py)
    assert encoder.prompt_text(example.source) == prompt_text
    plain = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    (encoded,) = encoder.encode_all([example])
    # train_neuron/train_sft.py: tokenizer([input_s, output_s], add_special_tokens=False), no EOS appended
    assert encoded.input_ids == plain(prompt_text) + plain("我喜欢茶。")
    assert encoded.prompt_length == len(plain(prompt_text))
    assert tokenizer.bos_token_id not in encoded.input_ids and tokenizer.eos_token_id not in encoded.input_ids
    # infer/infer.py tokenizes the prompt with the tokenizer's defaults: Llama-2 puts BOS first
    assert encoder.encode_prompt(example) == tokenizer(prompt_text)["input_ids"]
    assert encoder.encode_prompt(example)[0] == tokenizer.bos_token_id


def test_neft_lab_prompt_keeps_bos_and_eos(tmp_path):
    _, tokenizer = build_tiny_model("llama")
    task = _task(tmp_path)
    assert task.prompt_style == "neft_lab"
    (encoded,) = PromptEncoder(tokenizer, task).encode_all([Example("I like tea.", "tea")])
    assert encoded.input_ids[0] == tokenizer.bos_token_id and encoded.input_ids[-1] == tokenizer.eos_token_id


def test_authors_inst_prompt_is_their_lora_template(tmp_path):
    """baselines/train_with_lora.py: '[INST]' + prompt + ' ' + source + '[/INST]', tokenizer([input_s, output_s])
    with the tokenizer's special tokens (BOS before each), EOS appended."""
    _, tokenizer = build_tiny_model("llama")
    task = _task(tmp_path, "task.prompt_style=authors_inst")
    encoder = PromptEncoder(tokenizer, task)
    example = Example("I like tea.", "tea")
    prompt_text = f"[INST]{AUTHORS_ENZH} I like tea.[/INST]"
    assert encoder.prompt_text(example.source) == prompt_text
    (encoded,) = encoder.encode_all([example])
    full = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    assert encoded.input_ids == full(prompt_text) + full("tea") + [tokenizer.eos_token_id]
    assert encoded.prompt_length == len(full(prompt_text))
    assert encoder.encode_prompt(example) == full(prompt_text)  # infer/lora_model_infer.py


def test_authors_prompt_for_summaries_and_other_languages(tmp_path):
    de_en = _task(tmp_path, "task.prompt_style=authors", task="wmt_de_en")
    assert de_en.format_prompt("Hallo") == "Translate the following text from German to English. Hallo"
    xsum = _task(tmp_path, "task.prompt_style=authors", task="xsum")
    # data_process.py: "Given the below English article, generate a summary in French." + "\nArticle: " + text
    assert xsum.format_prompt("Text.") == (
        "Given the below English article, generate a summary in English.\nArticle: Text."
    )
    own = _task(tmp_path, "task.prompt_style=authors", "task.authors_prompt='Übersetze: {source}'")
    assert own.format_prompt("x") == "Übersetze: x"
    with pytest.raises(ConfigError, match="task.prompt_style"):
        _task(tmp_path, "task.prompt_style=theirs")
    with pytest.raises(ConfigError, match="task.authors_prompt"):
        _task(tmp_path, "task.prompt_style=authors", "task.source_lang=xx")


def test_authors_prompt_ignores_the_chat_template(tmp_path):
    _, tokenizer = build_tiny_model("llama")
    task = _task(tmp_path, "task.prompt_style=authors")
    with pytest.raises(ConfigError, match="chat_template"):
        PromptEncoder(tokenizer, task, chat_template=True)
    assert PromptEncoder(tokenizer, task, chat_template="auto").chat_template is False


# ------------------------------------------------------------------------------------------------
# the presets


def test_defaults_keep_neft_labs_protocol(tmp_path):
    cfg = compose(["task=wmt_en_zh", f"paths.run_dir={tmp_path}"])
    task = cfg.task
    assert (task.prompt_style, task.no_repeat_ngram_size, task.newlines) == ("neft_lab", 0, "cut")
    assert (task.max_new_tokens, task.data.max_test) == (256, 500)
    assert (cfg.strategy.name, compose(["strategy=lora"]).strategy.adapter_dtype) == ("full", "float32")


@pytest.mark.parametrize(
    ("preset", "task"),
    [
        ("paper_llama2", "embedded_en_fr"),
        ("paper_llama2_wmt_enzh", "wmt_en_zh"),
        ("paper_llama2_wmt_zhen", "wmt_zh_en"),
        ("paper_llama2_xsum", "xsum"),
    ],
)
def test_paper_presets_evaluate_as_the_authors(tmp_path, monkeypatch, preset, task):
    cfg = compose([f"experiment={preset}", f"paths.run_dir={tmp_path}"])
    t = cfg.task
    assert t.name == task
    assert (t.prompt_style, t.no_repeat_ngram_size, t.newlines, t.max_new_tokens) == (
        "authors",
        4,
        "strip",
        1024,
    )
    assert t.data.max_test is None  # the whole test set
    assert Task.from_config(t).prompt_style == "authors"
    # their LoRA row is one set of overrides away
    lora = compose(
        [
            f"experiment={preset}",
            "strategy=lora_authors",
            "task.prompt_style=authors_inst",
            "model.dtype=bfloat16",
            "optim.master_dtype=null",
            f"paths.run_dir={tmp_path}",
        ]
    )
    assert (lora.strategy.name, lora.strategy.adapter_dtype, lora.strategy.r) == ("lora", "bfloat16", 256)
    from neft_lab.validation import validate

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the presets are GPU runs (trainer=gpu)
    validate(lora)


# ------------------------------------------------------------------------------------------------
# LoRA's adapter dtype


def test_lora_adapters_stay_float32_by_default_and_bf16_as_the_authors():
    model, _ = build_tiny_model("llama")
    ours = LoraStrategy(r=4).apply(model, StrategyContext())
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}

    model, _ = build_tiny_model("llama")
    model = model.to(torch.bfloat16)  # the authors load the base in bf16
    authors = LoraStrategy(r=4, adapter_dtype="bfloat16").apply(model, StrategyContext())
    params = dict(authors.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if "norm" in n} == {torch.float32}  # their norms: float32
    assert authors.get_output_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="adapter_dtype"):
        LoraStrategy(adapter_dtype="float16")


def test_bf16_adapters_refuse_float32_masters(tmp_path):
    strategy = LoraStrategy(r=4, adapter_dtype="bfloat16")
    cfg = compose(["strategy=lora", f"paths.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="optim.master_dtype=null"):
        strategy.check_config(cfg)
    strategy.check_config(compose(["strategy=lora", "optim.master_dtype=null", f"paths.run_dir={tmp_path}"]))


def test_bf16_adapters_train_in_bf16(tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    from neft_lab.pipeline import run

    run_dir = tmp_path / "lora"
    overrides = [o for o in tiny_overrides if not o.startswith("paths.run_dir")]
    run(
        compose(
            [
                *overrides,
                f"paths.run_dir={run_dir}",
                "strategy=lora_authors",
                "strategy.r=4",
                "model.dtype=bfloat16",
                "optim.master_dtype=null",
                "trainer.precision=bf16-mixed",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "eval.before=false",
                "eval.after=false",
            ]
        )
    )
    adapter = load_file(str(run_dir / "export" / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# COMET on the training device


@pytest.mark.parametrize(
    ("device", "cuda", "gpus"),
    [("cpu", True, 0), ("cpu", False, 0), ("cuda", True, 1), ("cuda:0", True, 1), ("cuda", False, 0)],
)
def test_comet_follows_the_training_device(device, cuda, gpus):
    assert metrics_module.comet_gpus(torch.device(device), cuda_available=cuda) == gpus


def test_evaluate_scores_comet_on_the_models_device(tmp_path, monkeypatch):
    seen = {}

    def fake_comet(sources, predictions, references, model_name, batch_size=16, gpus=0):
        seen["gpus"] = gpus
        return 50.0

    monkeypatch.setattr(metrics_module, "comet", fake_comet)
    monkeypatch.setattr(metrics_module, "comet_gpus", lambda device, cuda_available=None: 7)
    model, tokenizer = build_tiny_model("llama")
    task = _task(tmp_path, "task.metrics=[comet]", "task.max_new_tokens=2")
    scores, _ = evaluate_module.evaluate(
        model, PromptEncoder(tokenizer, task), [Example("a", "b")], loss=False
    )
    assert seen["gpus"] == 7 and scores["comet"] == 50.0


# ------------------------------------------------------------------------------------------------
# the paper's clipping norm with gradient checkpointing (both on in the paper preset)

FORWARDS: list[int] = []


class CountForwards(L.Callback):
    """Counts the forwards of the first up_proj in the first training step: 2 when checkpointing recomputes
    it in the backward (torch's early stop ends the recomputation before the MLP returns: count a layer in it)."""

    def on_fit_start(self, trainer, module):
        FORWARDS.clear()
        up = next(m for n, m in module.named_modules() if n.endswith("layers.0.mlp.up_proj"))
        self.handle = up.register_forward_hook(lambda *_: FORWARDS.append(1) if up.training else None)

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.counted = len(FORWARDS)
        self.handle.remove()
        FORWARDS[:] = [self.counted]


def test_paper_clip_scope_with_gradient_checkpointing_is_the_dense_norm(tiny_overrides, tmp_path):
    from test_fidelity import GRADS, _dense_up_down_norm, _run

    max_norm = 1e-3
    _run(
        tiny_overrides,
        tmp_path,
        "ckpt",
        "strategy=random_neuron",
        "optim.clip_scope=paper",
        "model.gradient_checkpointing=true",
        f"trainer.gradient_clip_val={max_norm}",
        "trainer.precision=32-true",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "+callbacks.capture._target_=test_fidelity.CaptureGrads",
        "+callbacks.count._target_=test_eval_protocol.CountForwards",
    )
    assert FORWARDS == [2]  # the layer ran again in the backward: checkpointing was on
    raw, clipped = GRADS["raw"], GRADS["clipped"]
    selected_norm = math.sqrt(sum(float(g.double().square().sum()) for g in raw))
    dense_norm = _dense_up_down_norm(GRADS["batch"])  # autograd's, without checkpointing
    assert dense_norm > 1.05 * selected_norm
    coef = max_norm / (dense_norm + 1e-6)
    for before, after in zip(raw, clipped):
        torch.testing.assert_close(after, before * coef, rtol=2e-4, atol=1e-12)


def test_docs_fidelity_lists_the_protocol_options():
    from conftest import REPO

    text = (REPO / "docs" / "fidelity.md").read_text()
    for option in (
        "`task.no_repeat_ngram_size=4`",
        "`task.max_new_tokens=1024`",
        "`task.newlines=strip`",
        "`task.data.max_test=null`",
        "`task.prompt_style=authors`",
        "`strategy.adapter_dtype=bfloat16`",
        "task.prompt_style=authors_inst",
        "infer/infer.py",
        "baselines/train_with_lora.py",
        "train_neuron/train_sft.py",
    ):
        assert option in text, option
