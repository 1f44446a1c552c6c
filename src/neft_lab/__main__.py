"""`python -m neft_lab [overrides]`: the Hydra entry point over `conf/`."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from neft_lab.config import conf_dir, register_resolvers

logger = logging.getLogger("neft_lab")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One run. In a multirun a failed job is recorded and hands the sweeper its worst value so that the other
    jobs go on (neft_lab.sweep_summary), and a DDP rank > 0 of a multi-task job returns (submitit needs every
    task's result)."""
    from neft_lab.signals import exit_if_orphaned, watch_launcher
    from neft_lab.sweep_summary import in_multirun

    watch_launcher()  # a job a parallel/local launcher started: it stops when the launcher dies
    try:
        return _run_job(cfg, in_multirun())
    finally:
        exit_if_orphaned()  # its launcher died: the worker ends with this job


def _run_job(cfg: DictConfig, multirun: bool) -> float | None:
    from neft_lab.errors import ConfigError
    from neft_lab.run_folder import log_to_run_log
    from neft_lab.sweep_summary import job_failed

    try:
        _validate_before_imports(cfg)
        from neft_lab.pipeline import run

        return run(cfg)
    except ConfigError as err:  # a mistake the user can fix: say what and how, no traceback
        log_to_run_log(logging.ERROR, f"neft_lab error: {err}")  # the run log; the console once, on stderr
        print(f"neft_lab error: {err}", file=sys.stderr)
        if multirun:
            return job_failed(err)
        raise SystemExit(2) from None
    except Exception as err:
        storage = storage_error(err)
        if storage is not None and not multirun:  # ENOSPC/EROFS/EDQUOT: what happened and how to go on
            log_to_run_log(logging.ERROR, f"neft_lab error: {storage}")
            print(f"neft_lab error: {storage}", file=sys.stderr)
            raise SystemExit(2) from None
        if not multirun:
            raise
        logger.error("job failed: %s", err, exc_info=True)
        return job_failed(err)
    except SystemExit as err:
        if multirun and err.code in (0, None):
            return None
        raise  # a preempted job (143) or a requeue by submitit: the sweep stops, a rerun resumes it


def _validate_before_imports(cfg: DictConfig) -> None:
    """Check the config before torch, transformers and Lightning are imported (seconds on a busy machine), so a
    typo is refused in about a second; the folder Hydra made is set aside as `pipeline.run` does."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from neft_lab import run_folder
    from neft_lab.errors import ConfigError
    from neft_lab.ranks import launched_as_rank_zero
    from neft_lab.validation import validate

    try:
        validate(cfg)
    except ConfigError as err:
        folder = run_folder.hydra_output_dir() if launched_as_rank_zero() else None
        if folder is not None:
            output_dir = Path(str(OmegaConf.select(cfg, "paths.output_dir", default=None) or "outputs"))
            run_folder.after_failure(err, cfg, folder, output_dir, keep=False)
        raise


STORAGE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EFBIG"}


def storage_error(err: BaseException) -> str | None:
    """The one-line message for a write that failed because the disk is full or read-only (an OSError anywhere in
    the exception's chain, or torch's "file write failed"), else None. Checkpoints are written atomically, so
    the run resumes from its last one once there is room."""
    import errno

    codes = {getattr(errno, name) for name in STORAGE_ERRNOS if hasattr(errno, name)}
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in codes:
            where = f" ({cause.filename})" if cause.filename else ""
            return (
                f"disk full or not writable{where}: {cause.strerror}; free it (or point paths.run_dir / "
                "paths.cache_dir elsewhere) and rerun the same command to resume"
            )
        if isinstance(cause, RuntimeError) and "file write failed" in str(cause):
            return "disk full or not writable (a file write failed); free it and rerun the same command to resume"
        cause = cause.__cause__ or cause.__context__
    return None


def run_dir_error(argv: list[str]) -> str | None:
    """`hydra.run.dir=<a file>` (or hydra.sweep.dir): one line before Hydra fails to create it with a traceback."""
    from pathlib import Path

    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            path = Path(value.strip("'\"")).expanduser()
            for folder in (path, *path.parents):
                if folder.exists():
                    if not folder.is_dir():
                        return f"{key}={value}: {folder} is a file, not a folder: give {key} a folder path"
                    break
    return None


def _config_groups(root) -> set[str]:
    return {str(d.relative_to(root)) for d in root.rglob("*") if d.is_dir()}


def _node_has(cfg: DictConfig, key: str) -> bool:
    """Whether a dotted override key names an existing config value, or may be added without a `+` (a
    node that is not in struct mode)."""
    from omegaconf import ListConfig, OmegaConf

    node = cfg
    for part in key.split("."):
        if isinstance(node, ListConfig):
            if not (part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)):
                return False
            node = node[int(part)]
        elif isinstance(node, DictConfig):
            if part not in list(node):  # `in` alone is False for a `???` (missing) value
                return not OmegaConf.is_struct(node)
            node = node._get_node(part)
            node = node if isinstance(node, (DictConfig, ListConfig)) else None
        else:
            return False  # a plain value has no sub-keys
    return True


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        name = f"{prefix}{key}"
        keys.append(name)
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys += _dotted_keys(child, f"{name}.")
    return keys


def unknown_key_error(argv: list[str]) -> str | None:
    """The one-line error for an override of a key the composed config lacks (`optim.lrr=1e-4`), with the
    closest existing keys; None when every key exists or anything else is wrong (Hydra reports that).

    Hydra's own error suggests appending with `+optim.lrr=...`, which then fails in the run; checking
    first against the config the command composes (its group choices included) catches the typo."""
    import difflib

    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    from neft_lab.config import compose

    try:
        args = get_args_parser().parse_args(argv)
        if args.shell_completion or args.config_path or args.config_dir or args.experimental_rerun:
            return None
        overrides = OverridesParser.create().parse_overrides(args.overrides)
        root = conf_dir()
        groups = _config_groups(root)
        selections, values = [], []
        for override in overrides:
            key = override.key_or_group
            if key == "hydra" or key.startswith(("hydra.", "hydra/")):
                continue
            if key in groups:  # a group choice shapes the config: compose with it (a sweep's first option)
                if override.is_sweep_override():
                    first = next(iter(override.sweep_string_iterator()), None)
                    if first is None:
                        return None
                    selections.append(f"{override.input_line.split('=', 1)[0]}={first}")
                else:
                    selections.append(override.input_line)
            elif override.type == OverrideType.CHANGE and override.package is None:
                values.append(key)
        if not values:
            return None
        cfg = compose(selections, config_name=args.config_name or "config")
    except Exception:  # a bad option, a syntax error, ...: Hydra says what is wrong
        return None
    for key in values:
        if not _node_has(cfg, key):
            close = difflib.get_close_matches(key, _dotted_keys(cfg), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else f"`python -m neft_lab --cfg job` lists the keys; +{key}=... adds a new one"
            )
            return f"unknown key '{key}': {hint}"
    return None


def cli() -> None:
    """`python -m neft_lab`: refuse an unknown key, or a launcher/sweeper whose plugin is not installed, in one
    line before Hydra starts the job."""
    from neft_lab import signals
    from neft_lab.launchers import missing_plugin_error

    signals.install(sys.argv[1:])  # SIGTERM/SIGINT in any stage: exit 143/130 with the resume hint
    try:
        error = (
            missing_plugin_error(sys.argv[1:])
            or run_dir_error(sys.argv[1:])
            or unknown_key_error(sys.argv[1:])
        )
        if error:
            print(f"neft_lab error: {error}", file=sys.stderr)
            raise SystemExit(2)
        main()
    except signals.Stopped as err:  # also between two jobs of a sweep, outside any run
        signals.report(err)
        raise SystemExit(err.code) from None


if __name__ == "__main__":
    cli()
