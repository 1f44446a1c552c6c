"""`stage=export ckpt=<saved result>`: a saved result (e.g. a NeFT delta on its base model, a LoRA .ckpt) as a
merged Hugging Face folder, by default `<run>/export`; no run folder of its own."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from neft_lab.config_checks import check_common, check_saved_result

logger = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    check_common(cfg)
    check_saved_result(cfg, "export")  # model, strategy (and task unless given) come from the saved run


def run(cfg: DictConfig, run_dir: Path | None = None) -> None:
    export_saved(cfg)


def export_saved(cfg: DictConfig) -> Path:
    """Writes the merged folder (or finds the saved result already is one); returns where it is."""
    from neft_lab.integrity import check_finite_weights
    from neft_lab.io import atomic_dir
    from neft_lab.saved_runs import as_plain_layers, delta_file_of, load_saved_model, with_run_config

    path = Path(cfg.ckpt).expanduser()  # check() made sure it is given and exists
    run_root = path.parent.parent if path.suffix == ".ckpt" else path.parent if path.is_file() else path
    out_setting = (cfg.get("export") or {}).get("out")
    out = Path(out_setting).expanduser() if out_setting else run_root / "export"
    if delta_file_of(path) is None:
        folder = path / "export" if (path / "export").is_dir() else path
        if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
            if out_setting and out.resolve() != folder.resolve():  # export.out=<folder>: a copy there
                import shutil

                with atomic_dir(out) as tmp_dir:
                    shutil.copytree(folder, tmp_dir, dirs_exist_ok=True)
                logger.info("%s is already a Hugging Face folder: copied to %s", folder, out)
                return out
            logger.info("%s is already a Hugging Face folder: nothing to export", folder)
            return folder
    cfg = cfg.copy()
    OmegaConf.update(cfg, "paths.run_dir", str(run_root))  # this stage has no run folder of its own
    cfg = with_run_config(cfg, path)
    model, tokenizer = load_saved_model(cfg, path)
    check_finite_weights(model, path)  # NaN/inf weights: refused, not exported or scored as loss null, BLEU 0
    model = as_plain_layers(model)  # a LoRA .ckpt merged, NeFT's sliced layers plain again
    with atomic_dir(out) as tmp_dir:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
    logger.info("exported %s to %s", path, out)
    return out
