"""Runs README commands one after another in one Python process, for tests/test_readme_commands.py.

`python tests/readme_driver.py PLAN RESULTS`, from the workspace the commands run in. PLAN is a JSON list of
{"id", "module", "argv"}: module `neft_lab` runs `neft_lab.__main__.cli()` with `sys.argv = ["neft_lab", *argv]`
(what `python -m neft_lab ARGV` runs), `neft_lab.cache` runs `neft_lab.cache.main(argv)`. One process pays
torch's import once; it is not pytest's process because Hydra's entry point configures logging, signal
handlers and global singletons for a job. Each command's output goes to `logs/<n>.txt`; RESULTS gets, after
every command, its exit status (0 when it returned), seconds, the files it created or changed (below the
workspace and $NEFT_LAB_CACHE) and the sweep folders it made.

An argument may name what an earlier command made, resolved just before the command runs:
`@{newest:PATTERN}` is the newest path matching the glob PATTERN, `@{sweep:ID}` the sweep folder that
command ID made, `@{logged:ID:REGEX}` the REGEX's group in the last match in command ID's output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
import time
from pathlib import Path

TEMPLATE = re.compile(r"@\{(newest|sweep|logged):([^}]*)\}")


def snapshot(roots: list[Path]) -> dict[str, int]:
    files = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    files[path] = os.stat(path).st_mtime_ns
    return files


def resolve(token: str, sweeps: dict[str, list[str]], logs: dict[str, Path]) -> str:
    def one(match: re.Match) -> str:
        kind, what = match.groups()
        if kind == "logged":  # ID:REGEX, the REGEX's group in the last line of ID's output that matches it
            name, pattern = what.split(":", 1)
            found = re.findall(pattern, logs[name].read_text())
            if not found:
                raise LookupError(f"command {name} printed nothing matching {pattern}")
            return found[-1]
        if kind == "sweep":
            made = sweeps.get(what) or []
            if not made:
                raise LookupError(f"command {what} made no sweep folder")
            return made[-1]
        found = sorted(glob.glob(what, recursive=True), key=os.path.getmtime)
        if not found:
            raise LookupError(f"nothing matches {what}")
        return found[-1]

    return TEMPLATE.sub(one, token)


def run(module: str, argv: list[str]) -> int:
    if module == "neft_lab.cache":
        from neft_lab import cache

        return cache.main(argv)
    from hydra.core.global_hydra import GlobalHydra

    from neft_lab.__main__ import cli

    sys.argv = ["neft_lab", *argv]
    try:
        cli()
    finally:
        GlobalHydra.instance().clear()
    return 0


def main(plan_file: str, results_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    workspace, cache = Path.cwd(), Path(os.environ["NEFT_LAB_CACHE"])
    (workspace / "logs").mkdir(exist_ok=True)
    results: list[dict] = []
    sweeps: dict[str, list[str]] = {}
    logs: dict[str, Path] = {}
    last_end = 0
    for n, command in enumerate(plan):
        # Hydra names run and sweep folders by the second it resolves them, which can be a second after the
        # command started (it composes the config first): the next command starts in a later second than the
        # one the last one ended in, so no two share a folder
        while int(time.time()) <= last_end:
            time.sleep(0.05)
        before = snapshot([workspace / "outputs", workspace / "exported", cache])
        multiruns = set(glob.glob("outputs/multiruns/*"))
        logs[command["id"]] = workspace / "logs" / f"{n}.txt"
        log = logs[command["id"]].open("w")
        started, status, argv = time.time(), None, command["argv"]
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                argv = [resolve(token, sweeps, logs) for token in argv]
                print(f"$ python -m {command['module']} {' '.join(argv)}", flush=True)
                status = run(command["module"], argv)
            except SystemExit as err:
                status = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
                if not isinstance(err.code, int | None):
                    print(err.code)
            except Exception as err:  # noqa: BLE001 - recorded, the next command still runs
                import traceback

                traceback.print_exc()
                status = f"{type(err).__name__}: {err}"
        log.flush()
        last_end = int(time.time())
        after = snapshot([workspace / "outputs", workspace / "exported", cache])
        sweeps[command["id"]] = sorted(set(glob.glob("outputs/multiruns/*")) - multiruns)
        changed = sorted(p for p, t in after.items() if before.get(p) != t)
        results.append(
            {
                "id": command["id"],
                "argv": argv,
                "status": status,
                "seconds": round(time.time() - started, 2),
                "changed": [os.path.relpath(p, workspace) for p in changed],
                "sweeps": sweeps[command["id"]],
                "log": str(logs[command["id"]]),
            }
        )
        Path(results_file).write_text(json.dumps(results, indent=1))
        print(f"{command['id']}: {status} ({results[-1]['seconds']} s)", file=sys.__stdout__, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
