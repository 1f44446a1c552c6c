"""The paper's semantics by default: float32 masters under bf16, the HF linear schedule, a complete
reference cache key, the authors' clipping norm, reverse selection, the paper's budget counts."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.losses import target_token_loss
from neft_lab.models.tiny import build_tiny_model
from neft_lab.neurons.dense_norm import DenseGradNorm, frobenius_sq_of_outer
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.scoring import WeightSource, cosine_scores
from neft_lab.neurons.selection import Budget, budget_share, select
from neft_lab.pipeline import run
from neft_lab.selection_workflow import cache_folder, reference_key
from neft_lab.training.module import lr_schedule
from neft_lab.training.precision import check_precision

PAPER_LR = [
    "optim.lr=2e-5",
    "optim.scheduler=linear",
    "optim.warmup_steps=0",
    "trainer.max_steps=5",
    "trainer.val_check_interval=5",
    "trainer.precision=bf16-mixed",
    "eval.before=false",
    "eval.after=false",
]


def _run(tiny_overrides, tmp_path, name, *extra):
    overrides = [o for o in tiny_overrides if not o.startswith("paths.run_dir")]
    run_dir = tmp_path / name
    run(compose([*overrides, f"paths.run_dir={run_dir}", *PAPER_LR, *extra]))
    return run_dir


def _base_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model, _ = build_tiny_model("llama")
    return {k: v.to(dtype).float() for k, v in model.state_dict().items()}


def _slice_deltas(run_dir, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained minus base values of every selected vector, from the run's compact delta (float32 masters)."""
    delta = load_file(str(run_dir / "neft_delta.safetensors"))
    out = {}
    for key, vectors in delta.items():
        if not key.endswith(".vectors"):
            continue
        module = key[: -len(".vectors")]
        axis, indices = int(delta[f"{module}.axis"]), delta[f"{module}.indices"]
        out[module] = vectors.float() - base[f"{module}.weight"].index_select(axis, indices)
    return out


@pytest.mark.parametrize("impl", ["fused", "delta"])
def test_bf16_base_with_float32_masters_moves_every_selected_entry(tiny_overrides, tmp_path, impl):
    common = ["strategy=random_neuron", f"strategy.impl={impl}"]
    fp32 = _slice_deltas(_run(tiny_overrides, tmp_path, "fp32", *common), _base_state(torch.float32))
    bf16 = _slice_deltas(
        _run(tiny_overrides, tmp_path, "bf16", *common, "model.dtype=bfloat16"), _base_state(torch.bfloat16)
    )
    for module, update in bf16.items():
        assert bool((update != 0).all()), (
            f"{module}: {(update == 0).float().mean():.0%} of entries never moved"
        )
        reference = fp32[module]
        assert bool((reference != 0).all())
        # the same direction, the same size: AdamW's steps agree up to bf16 compute noise
        # (measured: cosine 0.999, relative difference 3-4%; bf16 compute noise flips a few tiny gradients)
        assert torch.nn.functional.cosine_similarity(update.flatten(), reference.flatten(), dim=0) > 0.995
        assert (update - reference).norm() < 0.1 * reference.norm()
    # the departure the option documents: without masters most updates round away in bf16 storage
    lossy = _slice_deltas(
        _run(tiny_overrides, tmp_path, "lossy", *common, "model.dtype=bfloat16", "optim.master_dtype=null"),
        _base_state(torch.bfloat16),
    )
    assert torch.cat([(u != 0).flatten() for u in lossy.values()]).float().mean() < 0.6  # measured 31% / 50%


def test_full_fine_tuning_of_a_bf16_model_trains_float32_masters(tiny_overrides, tmp_path):
    run_dir = _run(tiny_overrides, tmp_path, "full", "strategy=full", "model.dtype=bfloat16")
    trained = load_file(str(run_dir / "export" / "model.safetensors"))
    base = _base_state(torch.bfloat16)
    for name, tensor in trained.items():
        if name.endswith("proj.weight"):  # every linear weight gets a gradient on (nearly) every entry
            assert tensor.dtype == torch.float32, name
            # 5 steps of lr 2e-5 move ~1e-4: bf16 (8 bits of mantissa) would round nearly all of that away; the
            # few entries whose gradients stay below AdamW's eps (1e-8) move less than float32 can show
            moved = (tensor != base[name]).float().mean()
            assert moved > 0.99, f"{name}: only {moved:.1%} of the entries moved"


def test_precision_combinations_that_cannot_train_as_asked_are_refused():
    with pytest.raises(ConfigError, match="bf16-mixed"):
        check_precision("bfloat16", "32-true", "float32")
    with pytest.raises(ConfigError, match="master"):
        check_precision("float32", "bf16-true", "float32")
    check_precision("bfloat16", "bf16-mixed", "float32")
    check_precision("bfloat16", "bf16-true", None)  # pure bf16 on purpose


def test_default_schedule_is_the_papers_linear_decay_to_zero():
    cfg = compose([])
    assert cfg.optim.scheduler == "linear" and cfg.optim.warmup_steps == 0
    assert cfg.optim.master_dtype == "float32" and cfg.optim.weight_decay == 0 and cfg.optim.lr == 2e-5
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    schedule = lr_schedule(optimizer, cfg.optim.scheduler, cfg.optim.warmup_steps, 100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(2e-5) and lrs[50] == pytest.approx(1e-5)
    assert lrs[-1] == pytest.approx(2e-7) and optimizer.param_groups[0]["lr"] == 0.0


def _key_folder(tmp_path, *extra):
    fixed = ["selection.reference.steps=50"]  # by default K follows trainer.max_steps (checked below)
    cfg = compose(
        [
            "strategy=neft",
            "model=tiny",
            f"paths.cache_dir={tmp_path}",
            f"paths.run_dir={tmp_path}",
            *fixed,
            *extra,
        ]
    )
    return cache_folder(cfg)


@pytest.mark.parametrize(
    "change",
    [
        "optim.weight_decay=0.1",
        "optim.scheduler=cosine",
        "optim.warmup_steps=10",
        "optim.betas=[0.9,0.95]",
        "optim.eps=1e-6",
        "optim.master_dtype=null",
        "trainer.precision=bf16-mixed",
        "trainer.gradient_clip_val=0.5",
        "trainer.accumulate_grad_batches=2",
        "selection.reference.steps=7",
        "selection.reference.lr=1e-4",
        "seed=3",
        "task.max_prompt_tokens=99",
    ],
)
def test_anything_that_changes_the_reference_weights_builds_a_new_reference(tmp_path, change):
    assert _key_folder(tmp_path, change) != _key_folder(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        "eval.batch_size=3",
        "eval.show=0",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "task.max_new_tokens=9",
        "task.data.max_test=7",
        "budget=0.03",
        "strategy=reverse_selection",
        "strategy.impl=delta",
        "trainer.max_steps=17",
        "paths.output_dir=/elsewhere",
    ],
)
def test_eval_logging_and_the_runs_own_method_reuse_the_reference(tmp_path, change):
    assert _key_folder(tmp_path, change) == _key_folder(tmp_path)


def test_reference_key_is_the_reference_runs_config(tmp_path):
    key = reference_key(
        compose(["strategy=neft", "model=tiny", "selection.reference.steps=33", f"paths.run_dir={tmp_path}"])
    )
    assert key["trainer"]["max_steps"] == 33 and key["kinds"] == ["down", "up"]
    assert key["optim"]["weight_decay"] == 0.0 and key["optim"]["scheduler"] == "linear"
    assert "eval" not in key and "logger" not in key and "paths" not in key
    default = compose(["strategy=neft", "trainer.max_steps=77"])
    assert default.selection.reference.steps == 77  # the paper's M_FT runs as long as the NeFT run


# ------------------------------------------------------------------------------------------------
# clipping scope

GRADS: dict[str, list] = {}


class CaptureGrads(L.Callback):
    """Records the first batch, the slice gradients before clipping and (after optimizer.step) after it."""

    def on_fit_start(self, trainer, module):
        GRADS.clear()

        def after_clipping(optimizer, *args):
            GRADS["clipped"] = [p.grad.clone() for g in optimizer.param_groups for p in g["params"]]

        trainer.optimizers[0].register_step_post_hook(
            after_clipping
        )  # the closure (backward, clip) runs in step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        GRADS.setdefault("batch", {k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, module, optimizer):
        GRADS["raw"] = [p.grad.clone() for g in optimizer.param_groups for p in g["params"]]


def _dense_up_down_norm(batch: dict[str, torch.Tensor]) -> float:
    """The authors' norm: every up/down weight requires grad, nothing else; the norm of all their gradients."""
    model, _ = build_tiny_model("llama")
    model.requires_grad_(False)
    weights = [m.mlp.up_proj.weight for m in model.model.layers] + [
        m.mlp.down_proj.weight for m in model.model.layers
    ]
    for weight in weights:
        weight.requires_grad_(True)
    target_token_loss(model, batch)[0].backward()
    return math.sqrt(sum(float(w.grad.double().square().sum()) for w in weights))


@pytest.mark.parametrize("scope", ["selected", "paper"])
def test_clip_scope(tiny_overrides, tmp_path, scope):
    max_norm = 1e-3
    _run(
        tiny_overrides,
        tmp_path,
        scope,
        "strategy=random_neuron",
        f"optim.clip_scope={scope}",
        f"trainer.gradient_clip_val={max_norm}",
        "trainer.precision=32-true",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "+callbacks.capture._target_=test_fidelity.CaptureGrads",
    )
    raw, clipped = GRADS["raw"], GRADS["clipped"]
    selected_norm = math.sqrt(sum(float(g.double().square().sum()) for g in raw))
    dense_norm = _dense_up_down_norm(GRADS["batch"])
    assert dense_norm > 1.05 * selected_norm  # the two scopes differ on this model
    norm = selected_norm if scope == "selected" else dense_norm
    coef = max_norm / (norm + 1e-6)
    for before, after in zip(raw, clipped):
        torch.testing.assert_close(after, before * coef, rtol=2e-4, atol=1e-12)


def test_dense_norm_matches_dense_gradients_on_every_layer():
    """Both forms of ||gy^T x||, and the hooks on a model whose first layers hold no trainable slice."""
    x, gy = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert float(frobenius_sq_of_outer(x, gy)) == pytest.approx(float((gy.t() @ x).square().sum()), rel=1e-5)
    x, gy = torch.randn(50, 7), torch.randn(50, 3)
    assert float(frobenius_sq_of_outer(x, gy)) == pytest.approx(float((gy.t() @ x).square().sum()), rel=1e-5)

    model, tokenizer = build_tiny_model("llama")
    ids = torch.randint(0, 512, (3, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.requires_grad_(False)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)  # only the last layer trains
    names = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")]
    probe = DenseGradNorm(model, names)
    target_token_loss(model, batch)[0].backward()
    measured = float(probe.take())
    probe.remove()
    assert measured == pytest.approx(_dense_up_down_norm(batch), rel=1e-4)
    assert float(probe.take()) == 0.0  # take() resets


def test_paper_clip_scope_refuses_what_it_cannot_compute_exactly(tiny_overrides, tmp_path):
    for bad in ("trainer.accumulate_grad_batches=2", "trainer.devices=2"):
        with pytest.raises(ConfigError, match="clip_scope"):
            _run(tiny_overrides, tmp_path, "bad", "strategy=random_neuron", "optim.clip_scope=paper", bad)


# ------------------------------------------------------------------------------------------------
# selection and budgets


def test_reverse_picks_exactly_the_least_moved_vectors():
    """Every vector rotated by its own known angle: cosine picks the most moved, reverse the least moved."""
    base, _ = build_tiny_model("llama")
    reference, _ = build_tiny_model("llama")
    space = NeuronSpace.from_model(base)
    generator = torch.Generator().manual_seed(0)
    angles = torch.randperm(space.num_vectors, generator=generator).float() / space.num_vectors * 1.5 + 0.01
    expected_cosine, start = {}, 0
    with torch.no_grad():
        for group in space.groups:
            weight = reference.get_submodule(group.module).weight
            vectors = weight if group.axis == 0 else weight.t()  # a view: rows are this group's vectors
            theta = angles[start : start + group.count]
            start += group.count
            orthogonal = torch.randn(vectors.shape, generator=generator)
            orthogonal -= (
                (orthogonal * vectors).sum(1, keepdim=True) / vectors.square().sum(1, keepdim=True) * vectors
            )
            orthogonal *= vectors.norm(dim=1, keepdim=True) / orthogonal.norm(dim=1, keepdim=True)
            vectors.copy_(torch.cos(theta)[:, None] * vectors + torch.sin(theta)[:, None] * orthogonal)
            expected_cosine[group.name] = torch.cos(theta)
    scores = cosine_scores(WeightSource(base), WeightSource(reference), space)
    for name, cosines in expected_cosine.items():
        torch.testing.assert_close(scores[name], cosines, atol=1e-4, rtol=0)
    k = 37
    budget = k * 64
    flat_angles = angles
    least_moved = set(torch.argsort(flat_angles)[:k].tolist())
    most_moved = set(torch.argsort(flat_angles, descending=True)[:k].tolist())

    def flat_indices(neuron_set):
        offsets, out, start = {}, set(), 0
        for group in space.groups:
            offsets[group.name] = start
            start += group.count
        for name, idx in neuron_set.indices.items():
            out |= {offsets[name] + int(i) for i in idx}
        return out

    assert flat_indices(select(scores, space, budget, "reverse")) == least_moved
    assert flat_indices(select(scores, space, budget, "cosine")) == most_moved


def test_paper_budget_points_give_the_papers_vector_counts_on_llama2_7b():
    """Llama-2-7B's shapes (no weights): `paper_9` is 150,000 vectors, a 0.09 share 148,060."""
    shapes = {}
    for layer in range(32):
        shapes[f"model.layers.{layer}.mlp.up_proj.weight"] = (11008, 4096)
        shapes[f"model.layers.{layer}.mlp.down_proj.weight"] = (4096, 11008)
    space = NeuronSpace.from_shapes("llama", shapes, ["up", "down"])
    total = 6_738_415_616
    for point, vectors in (
        ("paper_3", 50_000),
        ("paper_6", 100_000),
        ("paper_9", 150_000),
        ("paper_12", 200_000),
    ):
        parameters = Budget("share", budget_share(point)).parameters(space, total)
        assert parameters // 4096 == vectors, point
    assert Budget("share", 0.09).parameters(space, total) // 4096 == 148_060
    assert compose(["strategy=neft", "budget=paper_9"]).selection.budget.value == pytest.approx(0.0911787)
    with pytest.raises(ConfigError, match="paper_9"):
        budget_share("paper_x")


# ------------------------------------------------------------------------------------------------
# the paper presets


@pytest.mark.parametrize(
    ("preset", "task", "batch"),
    [
        ("paper_llama2_wmt_enzh", "wmt_en_zh", 6),
        ("paper_llama2_wmt_zhen", "wmt_zh_en", 6),
        ("paper_llama2_xsum", "xsum", 3),
    ],
)
def test_paper_presets_set_the_papers_hyperparameters(tmp_path, preset, task, batch):
    cfg = compose([f"experiment={preset}", f"paths.run_dir={tmp_path}"])
    assert (cfg.model.name, cfg.model.dtype, cfg.task.name) == ("llama2_7b_chat", "float32", task)
    assert (cfg.trainer.precision, cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val) == (
        "bf16-mixed",
        2,  # by epochs, max_steps=-1 (tests/test_paper_presets.py)
        1.0,
    )
    assert dict(cfg.optim) == {
        "lr": 2e-5,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "scheduler": "linear",
        "warmup_steps": 0,
        "master_dtype": "float32",
        "clip_scope": "paper",
        "loss_average": "rank",  # each device's token mean, as their Trainer
    }
    assert (cfg.strategy.name, cfg.selection.method, cfg.selection.pooling) == ("neft", "cosine", "global")
    assert cfg.selection.budget.value == pytest.approx(150_000 * 4096 / 6_738_415_616)
    assert (
        cfg.selection.reference.steps == 3200
        and cfg.loader.batch_size == batch == cfg.selection.reference.batch_size
    )
    assert cfg.task.bleu_lowercase == (task != "xsum")
    # a baseline at the same settings is one override away
    lora = compose([f"experiment={preset}", "strategy=lora", "strategy.r=256", f"paths.run_dir={tmp_path}"])
    assert lora.strategy.name == "lora" and lora.selection.name == "none" and lora.optim.lr == 2e-5


def test_paper_preset_runs_end_to_end_on_the_tiny_model(tmp_path):
    """The whole preset (paper clipping, float32 masters, bf16 autocast, linear decay) on a small stand-in."""
    run_dir = tmp_path / "run"
    run(
        compose(
            [
                "experiment=paper_llama2_wmt_enzh",
                "model=tiny",
                "trainer=cpu",
                "trainer.precision=bf16-mixed",
                "task=embedded",
                "task.data.embedded.n_train=64",
                "task.data.embedded.n_val=8",
                "task.data.embedded.n_test=4",
                "task.metrics=[bleu]",
                "trainer.max_steps=4",
                "trainer.val_check_interval=2",
                "selection.reference.steps=4",
                "logger=none",
                "resume=false",
                "trainer.enable_progress_bar=false",
                f"paths.run_dir={run_dir}",
                f"paths.cache_dir={tmp_path / 'cache'}",
            ]
        )
    )
    metrics = read_metrics(run_dir)
    assert metrics["strategy"] == "neft" and metrics["train"]["steps"] == 4
    assert "case:lc" in metrics["after"]["bleu_signature"]


# what docs/fidelity.md says each default is, as the text states it
DOCUMENTED_DEFAULTS = [
    ("selection.modules", ["up", "down"], "`selection.modules=[up, down]`"),
    ("selection.pooling", "global", "`selection.pooling=per_layer`"),
    ("budget", 0.09, "`budget=0.09`"),
    ("strategy.impl", "fused", "`strategy.impl=fused`"),
    ("trainer.gradient_clip_val", 1.0, "`trainer.gradient_clip_val=1.0`"),
    ("optim.clip_scope", "selected", "`optim.clip_scope=selected`"),
    ("optim.loss_average", "rank", "`optim.loss_average=rank`"),
    ("optim.weight_decay", 0.0, "| weight decay | 0 (HF default)"),
    ("optim.lr", 2e-5, "| learning rate | 2e-5 | 2e-5 | 2e-5 |"),
    ("optim.betas", [0.9, 0.999], "(0.9, 0.999, 1e-8)"),
    ("optim.eps", 1e-8, "(0.9, 0.999, 1e-8)"),
    ("optim.scheduler", "linear", "linear decay to 0, no warmup | same"),
    ("optim.warmup_steps", 0, "linear decay to 0, no warmup | same"),
    ("optim.master_dtype", "float32", "`optim.master_dtype=float32`"),
    ("loader.batch_size", 8, "`loader.batch_size=8`"),
    ("loader.group_by_length", False, "`loader.group_by_length=false`"),
    ("trainer.max_steps", 200, "`trainer.max_steps=200`"),
    ("task.bleu_lowercase", False, "`task.bleu_lowercase=true`"),
    ("callbacks.model_checkpoint.monitor", "val/loss", "best by `val/loss`"),
]


@pytest.mark.parametrize(
    ("key", "value", "text"), DOCUMENTED_DEFAULTS, ids=[k for k, _, _ in DOCUMENTED_DEFAULTS]
)
def test_defaults_are_what_docs_fidelity_says(key, value, text):
    from omegaconf import OmegaConf

    from conftest import REPO

    cfg = compose(["strategy=neft", "task=wmt_zh_en"])
    actual = OmegaConf.select(cfg, key)
    assert (OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual) == value
    assert text in (REPO / "docs" / "fidelity.md").read_text()
    assert cfg.selection.reference.steps == cfg.trainer.max_steps
