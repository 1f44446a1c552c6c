"""The paper presets follow what the authors ran (issue 18, items 2, 3 and 5):

- budget points are the paper's table of vector counts (Table 7; the authors' Figure 3/4 code for 4, 7
  and 10%), not a proportion of 150,000, and an unknown point is refused;
- the presets train by epochs (2; LoRA 3) with the learning-rate schedule over the whole run,
  validation every 75 steps and the best checkpoint by validation loss;
- the reference model M_FT is the checkpoint at step K of a full fine-tune with its own horizon
  (`selection.reference.horizon`), so one run serves K=800 and K=3,200.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO
from neft_lab import selection_workflow as workflow
from neft_lab.config import compose
from neft_lab.errors import ConfigError
from neft_lab.neurons.geometry import NeuronSpace
from neft_lab.neurons.selection import PAPER_POINTS, Budget, budget_share
from neft_lab.pipeline import run
from neft_lab.validation import validate

LLAMA2_7B_PARAMETERS = 6_738_415_616

# Table 7's parameter counts / 4096, and the authors' Figure 3/4 code (cos-12.5w, cos-17.5w, Reversed 7.5w)
PAPER_COUNTS = {
    "0.4": 6_250,  # 25.6M
    "1.5": 25_000,  # 102.4M
    "3": 50_000,  # 204.8M
    "4": 75_000,  # Reversed4% (7.5w)
    "6": 100_000,  # 409.6M
    "7": 125_000,  # NeFT7% (12.5w)
    "9": 150_000,  # 614.4M
    "10": 175_000,  # NeFT10% (17.5w)
    "12": 200_000,  # 819.2M
}


def _llama2_7b_space() -> NeuronSpace:
    shapes = {}
    for layer in range(32):
        shapes[f"model.layers.{layer}.mlp.up_proj.weight"] = (11008, 4096)
        shapes[f"model.layers.{layer}.mlp.down_proj.weight"] = (4096, 11008)
    return NeuronSpace.from_shapes("llama", shapes, ["up", "down"])


# ---- §5: budget points -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("label", "vectors"), PAPER_COUNTS.items(), ids=list(PAPER_COUNTS))
def test_paper_points_are_the_papers_vector_counts(label, vectors):
    space = _llama2_7b_space()
    parameters = Budget("share", budget_share(f"paper_{label}")).parameters(space, LLAMA2_7B_PARAMETERS)
    assert parameters == vectors * 4096
    assert PAPER_POINTS[label] == vectors


def test_paper_9_is_exactly_what_it_was():
    assert budget_share("paper_9") == 150_000 * 4096 / LLAMA2_7B_PARAMETERS
    assert compose(["strategy=neft", "budget=paper_9"]).selection.budget.value == budget_share("paper_9")


@pytest.mark.parametrize("point", ["paper_5", "paper_0.5", "paper_x", "paper_"])
def test_an_unknown_paper_point_is_refused_listing_the_known_ones(point):
    with pytest.raises(ConfigError, match=r"paper_0\.4 .*paper_1\.5 .*paper_3 .*paper_12"):
        budget_share(point)
    with pytest.raises(ConfigError, match=r"paper_0\.4"):
        validate(compose(["strategy=neft", f"budget={point}", "paths.run_dir=/tmp/x"]))


def test_reverse_share_takes_a_paper_point():
    cfg = compose(["strategy=neft", "selection=cosine_plus_reverse", "selection.reverse_share=paper_4"])
    workflow.check_selection(cfg)
    assert workflow.reverse_parameters(cfg.selection, LLAMA2_7B_PARAMETERS) == 75_000 * 4096
    with pytest.raises(ConfigError, match="paper_0.4"):
        workflow.check_selection(
            compose(["strategy=neft", "selection=cosine_plus_reverse", "selection.reverse_share=paper_5"])
        )


def _sweep(name: str) -> dict[str, list[str]]:
    params = OmegaConf.load(REPO / "sweeps" / f"{name}.yaml").hydra.sweeper.params
    return {key: str(values).split(",") for key, values in params.items()}


def test_figure_3_and_4_sweeps_use_the_paper_points():
    neft = _sweep("budget_figure3")
    assert neft["budget"] == ["paper_3", "paper_6", "paper_7", "paper_9", "paper_10", "paper_12"]
    mixed = _sweep("budget_figure3_reversed")
    assert mixed["selection.reverse_share"] == ["paper_3", "paper_4", "paper_6", "paper_7", "paper_9"]
    body = OmegaConf.load(REPO / "sweeps" / "budget_figure3_reversed.yaml")
    assert body.budget == "paper_3"
    for name in ("budget_neft", "budget_lora"):  # Table 7's grid
        assert _sweep(name)["budget"] == [f"paper_{p}" for p in ("0.4", "1.5", "3", "6", "9", "12")]


# ---- §2: the presets train by epochs ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["paper_llama2", "paper_llama2_wmt_enzh", "paper_llama2_xsum"])
def test_paper_presets_train_by_epochs_with_the_schedule_over_the_whole_run(preset):
    cfg = compose([f"experiment={preset}", "paths.run_dir=/tmp/x"])
    trainer = cfg.trainer
    assert (trainer.max_steps, trainer.max_epochs) == (-1, 2)  # the authors' num_train_epochs 2
    assert (trainer.val_check_interval, trainer.check_val_every_n_epoch) == (75, None)  # eval_steps 75
    assert cfg.callbacks.model_checkpoint.monitor == "val/loss"
    for strategy, epochs in (("full", 2), ("lora", 3), ("random_neuron", 2), ("ft_in_out", 2)):
        other = compose([f"experiment={preset}", f"strategy={strategy}", "paths.run_dir=/tmp/x"])
        assert other.trainer.max_epochs == epochs, strategy
    stopping = compose([f"experiment={preset}", "callbacks=early_stopping", "paths.run_dir=/tmp/x"])
    assert stopping.callbacks.early_stopping.monitor == "val/loss"
    # the reference: checkpoint 3,200 of a 2-epoch full fine-tune; "Early" is step 800 of the same run
    assert cfg.selection.reference.steps == 3200
    assert cfg.selection.reference.horizon == "2ep"
    assert 800 in cfg.selection.reference.snapshots


class LrProbe(L.Callback):
    """Writes the learning rate after every optimizer step (what the next step will use) to `out`."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, *_):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.out.write_text(json.dumps(self.lrs))


def test_a_run_by_epochs_schedules_its_learning_rate_over_all_its_epochs(tiny_overrides, tmp_path):
    probe = tmp_path / "lrs.json"
    run(
        compose(
            [
                *tiny_overrides,
                "strategy=full",
                "trainer.max_steps=-1",
                "trainer.max_epochs=2",
                "trainer.val_check_interval=2",
                "task.data.embedded.n_train=64",  # 4 batches of 16 per epoch
                "optim.scheduler=linear",
                "optim.warmup_steps=0",
                "optim.lr=1e-3",
                "eval.before=false",
                "eval.after=false",
                "+callbacks.lr_probe._target_=test_paper_presets.LrProbe",
                f"+callbacks.lr_probe.out={probe}",
            ]
        )
    )
    lrs = json.loads(probe.read_text())
    assert len(lrs) == 8  # two epochs of 4 steps
    assert lrs[3] == pytest.approx(0.5e-3)  # half-way through the whole run, not the end of a horizon
    assert lrs[-1] == 0.0


def test_a_run_without_max_steps_needs_max_epochs(tiny_overrides):
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        validate(compose([*tiny_overrides, "trainer.max_steps=-1", "trainer.max_epochs=-1"]))
    validate(compose([*tiny_overrides, "trainer.max_steps=-1", "trainer.max_epochs=2"]))


# ---- §3: the reference as step K of a run with its own horizon ------------------------------------------
REF = [
    "strategy=neft",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "eval.before=false",
    "eval.after=false",
    "optim.scheduler=linear",
    "optim.warmup_steps=0",
]


def test_the_horizon_is_in_the_cache_key_and_one_folder_serves_every_k(tiny_overrides):
    def cfg(*extra: str):
        return compose([*tiny_overrides, *REF, *extra])

    today = cfg("selection.reference.steps=4")
    longer = cfg("selection.reference.steps=4", "selection.reference.horizon=8")
    early = cfg("selection.reference.steps=2", "selection.reference.horizon=8")
    assert today.selection.reference.horizon is None  # default: the horizon is K (our reference runs)
    assert workflow.cache_folder(today).name.split("-")[-3] == "K4"  # unchanged for horizon=null
    assert workflow.reference_key(today) != workflow.reference_key(longer)
    assert workflow.cache_folder(today) != workflow.cache_folder(longer)
    # one run (one folder) for every K of the same horizon; the scores of each K keyed apart
    assert workflow.cache_folder(longer) == workflow.cache_folder(early)
    assert workflow.scores_key(longer) != workflow.scores_key(early)
    assert workflow.scores_folder(longer) != workflow.scores_folder(early)
    assert workflow.cache_folder(longer) != workflow.cache_folder(cfg("selection.reference.horizon=2ep"))
    with pytest.raises(ConfigError, match="selection.reference.horizon"):
        workflow.check_selection(cfg("selection.reference.steps=4", "selection.reference.horizon=3"))
    with pytest.raises(ConfigError, match="selection.reference.horizon"):
        workflow.check_selection(cfg("selection.reference.horizon=two"))


def _snapshot_lr(cache: Path, step: int) -> float:
    (snapshot,) = cache.glob(f"neft/*/snapshots/step{step:06d}.ckpt")
    state = torch.load(snapshot, map_location="cpu", weights_only=False)
    return float(state["lr_schedulers"][0]["_last_lr"][0])


def _reference_weights(cache: Path, k: int) -> dict[str, torch.Tensor]:
    (export,) = cache.glob(f"neft/*/K{k:06d}/reference/export")
    return {
        name: tensor for f in sorted(export.glob("*.safetensors")) for name, tensor in load_file(f).items()
    }


class _StepCounter:
    def __init__(self, monkeypatch):
        from neft_lab.training.module import CausalLMModule

        self.steps = 0
        original = CausalLMModule.training_step

        def counted(module, *args, **kwargs):
            self.steps += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(CausalLMModule, "training_step", counted)


def test_a_reference_with_a_longer_horizon_still_learns_at_step_k(tiny_overrides, tmp_path):
    base = [o for o in tiny_overrides if not o.startswith("paths.cache_dir")]
    lr = compose([*base, *REF]).optim.lr
    longer, short = tmp_path / "longer", tmp_path / "short"
    for cache, horizon in ((longer, "8"), (short, "null")):
        run(compose([*base, *REF, "stage=reference", f"paths.cache_dir={cache}",
                     f"selection.reference.horizon={horizon}"]))  # fmt: skip
    assert _snapshot_lr(longer, 4) == pytest.approx(lr / 2)  # step 4 of 8: half the peak
    assert not list(short.glob("neft/*/snapshots"))  # horizon=null: today's K-step run
    (short_export,) = short.glob("neft/*/reference/export")
    short_weights = {n: t for f in short_export.glob("*.safetensors") for n, t in load_file(f).items()}
    longer_weights = _reference_weights(longer, 4)
    assert any(not torch.equal(short_weights[n], longer_weights[n]) for n in short_weights)


def test_a_reference_horizon_in_epochs_counts_the_reference_runs_own_batches(tiny_overrides, tmp_path):
    """`2ep` as in the presets, in small: 1 epoch of 64 examples at batch 16 = 4 steps; K=2 is half-way."""
    base = [o for o in tiny_overrides if not o.startswith("paths.cache_dir")]
    cfg = compose([*base, *REF, "stage=reference", f"paths.cache_dir={tmp_path}", "selection.reference.steps=2",
                   "selection.reference.horizon=1ep", "task.data.embedded.n_train=64"])  # fmt: skip
    assert workflow.cache_folder(cfg).name.split("-")[-3] == "H1ep"
    run(cfg)
    assert _snapshot_lr(tmp_path, 2) == pytest.approx(cfg.optim.lr / 2)


def test_k_800_and_k_3200_come_from_one_reference_run(tiny_overrides, tmp_path, monkeypatch):
    """In small: K=2 and K=4 of one 8-step schedule. K=4 first (snapshot at 2 on the way), then K=2 from the
    cache without training; in another cache K=2 first, then K=4 continues from it: the same weights."""
    counter = _StepCounter(monkeypatch)
    base = [o for o in tiny_overrides if not o.startswith("paths.cache_dir")]
    one, two = tmp_path / "one", tmp_path / "two"

    def score(cache: Path, k: int) -> None:
        run(compose([*base, *REF, "stage=score", f"paths.cache_dir={cache}", f"selection.reference.steps={k}",
                     "selection.reference.horizon=8", "selection.reference.snapshots=[2]"]))  # fmt: skip

    score(one, 4)
    assert counter.steps == 4
    score(one, 2)  # "Early": the step-2 snapshot of the same run
    assert counter.steps == 4
    assert len(list(one.glob("neft/*"))) == 1  # one reference folder
    assert len(list(one.glob("neft/*/K*/scores.safetensors"))) == 2

    score(two, 2)
    score(two, 4)  # continues the K=2 run from its step-2 snapshot
    assert counter.steps == 4 + 2 + 2
    for k in (2, 4):
        a, b = _reference_weights(one, k), _reference_weights(two, k)
        assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), k
    assert _snapshot_lr(two, 2) == pytest.approx(_snapshot_lr(one, 2))


def test_decoding_settings_leave_the_reference_key_alone(tiny_overrides):
    """The authors' decoding (no_repeat_ngram_size, newlines=strip, a length cap) changes no reference weight:
    a sweep over evaluation protocols must reuse one cached reference."""
    base = compose([*tiny_overrides, *REF, "selection.reference.steps=4"])
    decoded = compose(
        [*tiny_overrides, *REF, "selection.reference.steps=4", "task.no_repeat_ngram_size=4", "task.newlines=strip",
         "task.max_new_tokens_ratio=2", "task.max_new_tokens=1024"]
    )  # fmt: skip
    assert workflow.reference_key(base) == workflow.reference_key(decoded)
    assert workflow.cache_folder(base) == workflow.cache_folder(decoded)
    prompt = compose([*tiny_overrides, *REF, "selection.reference.steps=4", "task.prompt_style=authors"])
    # the training prompt does change them
    assert workflow.reference_key(base) != workflow.reference_key(prompt)
