"""``zsad bench SPEC``: run a grid of methods × protocols × seeds, then write the leaderboard.

Bench spec (``experiments/bench/*.yaml``)::

    name: default                        # names the grid in logs and in results/runs.json
    title: "Synthetic benchmark, tiny backbones"   # first line of the leaderboard
    base: other.yaml                     # optional: start from another spec (path relative to this file);
                                         # keys given here replace the base's (lists are replaced, not appended)
    out: results                         # leaderboard folder (`zsad bench --out` overrides)
    runs_dir: runs/bench                 # run folders: <runs_dir>/<label>-<protocol>-s<seed>/
    methods:                             # one leaderboard row each, in this order
      - name: ava_dino                   # row label (unique)
        config: experiments/methods/ava_dino.yaml   # the method's YAML layer
        tiny: true                       # optional: the tiny random-weight backbone presets
                                         # (zsad.registry.tiny_overrides), before `overrides`
        toy: true                        # optional: instead, the toy-pretrained backbones of `zsad pretrain`
                                         # (zsad.pretrain.cache.toy_overrides); built before the first run
        overrides: [method.image_size=112]          # key=value for this method only
    protocols: [synthetic]               # each loads experiments/protocols/<p>.yaml (override protocol=<p>)
    seeds: [0]
    overrides: [trainer.max_epochs=1]    # key=value for every run
    ablations: experiments/ablations     # optional: every <method>_<what>.yaml there adds a row
                                         # "<method>_<what>" = the method's default + that YAML layer
                                         # (with variant=<what> unless the file sets its own variant)

Each run is composed as ``compose([config, ablation?], ["protocol=<p>", "seed=<s>", "out_dir=<runs_dir>",
"run_name=<label>-<p>-s<s>", *overrides, *method overrides, *cli overrides])``; CLI overrides of the form
``bench.<key>=<value>`` change the spec itself instead (e.g. ``bench.seeds=[0,1,2]``). Relative paths in a spec
are taken from the current folder, else from the project root.

Every run is composed before any trains (a config error stops the grid before it costs anything). A run whose
folder holds a ``metrics.json`` made with the same config is reused; ``force`` re-runs everything from scratch;
a run whose saved config differs from the spec's is re-run from scratch (the differing keys are logged; keys
the saved config lacks, i.e. added to the schema later, are not differences); a run
interrupted mid-way resumes from its stage checkpoints. A failing run is recorded (``<run>/error.txt``,
``results/runs.json``, the leaderboard's "Failed runs") and the grid goes on; ``run_bench`` raises
``BenchFailed`` (a ``SystemExit``, exit status 1) at the end when any run failed.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zsad import config as C
from zsad.config import ConfigError, compose, load_yaml, run_name

log = logging.getLogger("zsad.bench")
SPEC_KEYS = {
    "name",
    "title",
    "base",
    "out",
    "runs_dir",
    "methods",
    "protocols",
    "seeds",
    "overrides",
    "ablations",
}
METHOD_KEYS = {"name", "config", "overrides", "tiny", "toy"}
# Keys that change how a run executes or logs, not its numbers: a finished run differing only here is reused.
RUNTIME_KEYS = (
    "logger",
    "wandb",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "checkpoint",
)


class BenchFailed(SystemExit):
    """Some runs of the grid failed (the leaderboard of the others was written first).

    A ``SystemExit`` whose code is the message: uncaught, Python prints it and exits with status 1.
    """


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: Path
    overrides: tuple[str, ...] = ()


@dataclass
class BenchSpec:
    """A parsed bench YAML."""

    path: Path
    name: str
    title: str
    out: Path
    runs_dir: Path
    methods: list[MethodEntry]
    protocols: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    ablations: Path | None = None


@dataclass
class GridRun:
    """One cell of the grid: a leaderboard row (label) under one protocol and seed."""

    label: str
    method: str  # the spec's method entry this run belongs to
    protocol: str
    seed: int
    layers: list[Path]
    overrides: list[str]
    cfg: DictConfig | None = None

    @property
    def name(self) -> str:
        return f"{self.label}-{self.protocol}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        assert self.cfg is not None, "compose the run first"
        return Path(self.cfg.out_dir) / run_name(self.cfg)


# ---------------------------------------------------------------------------------------------------------------
# the spec


def resolve_path(p: str | Path, what: str) -> Path:
    """A path from a spec: absolute, else relative to the current folder, else to the project root."""
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    root = C.EXPERIMENTS.parent  # the project root
    if (root / path).exists():
        return root / path
    raise ConfigError(f"{what}: {p} not found (relative to {Path.cwd()} or {root})")


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    raw = load_yaml(path)
    unknown = set(raw.keys()) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected some of {sorted(SPEC_KEYS)}")
    if "base" in raw:
        base = _read_raw(path.parent / str(raw.base), (*seen, path.resolve()))
        raw = OmegaConf.merge(base, {k: v for k, v in raw.items() if k != "base"})
    return raw


def load_spec(path: Path, overrides: list[str] = ()) -> BenchSpec:
    """Parse and check a bench YAML; ``bench.<key>=<value>`` overrides change the spec.

    Raises:
        ConfigError: a missing file, an unknown key, a key of the wrong type, a method YAML or protocol not found.
    """
    path = Path(path)
    raw = _read_raw(path)
    spec_over = [o.removeprefix("bench.") for o in overrides if o.startswith("bench.")]
    if spec_over:
        try:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(spec_over))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"cannot apply bench overrides {spec_over}: {e}") from e
        unknown = set(raw.keys()) - SPEC_KEYS
        if unknown:
            raise ConfigError(f"bench override(s) name unknown spec key(s) {sorted(unknown)}")
    d: dict[str, Any] = OmegaConf.to_container(raw, resolve=True)  # type: ignore[assignment]
    for key in ("methods", "protocols", "seeds"):
        if not isinstance(d.get(key), list) or not d[key]:
            raise ConfigError(f"{path}: '{key}' must be a non-empty list")
    methods = [_method_entry(m, path, i) for i, m in enumerate(d["methods"])]
    names = [m.name for m in methods]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"{path}: method names must be unique (they are leaderboard rows); repeated: {dupes}"
        )
    for p in d["protocols"]:
        if not (C.EXPERIMENTS / "protocols" / f"{p}.yaml").is_file():
            raise ConfigError(f"{path}: protocols: no experiments/protocols/{p}.yaml for protocol {p!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in d["seeds"]):
        raise ConfigError(f"{path}: seeds must be integers, got {d['seeds']}")
    overrides_all = d.get("overrides") or []
    _check_overrides(overrides_all, f"{path}: overrides")
    return BenchSpec(
        path=path,
        name=str(d.get("name") or path.stem),
        title=str(d.get("title") or f"zsad benchmark {path.stem}"),
        out=Path(d.get("out") or "results"),
        runs_dir=Path(d.get("runs_dir") or f"runs/{path.stem}"),
        methods=methods,
        protocols=[str(p) for p in d["protocols"]],
        seeds=list(d["seeds"]),
        overrides=[str(o) for o in overrides_all],
        ablations=resolve_path(d["ablations"], f"{path}: ablations") if d.get("ablations") else None,
    )


def _method_entry(m: Any, path: Path, i: int) -> MethodEntry:
    where = f"{path}: methods[{i}]"
    if not isinstance(m, dict) or "name" not in m or "config" not in m:
        raise ConfigError(f"{where} must be a mapping with 'name' and 'config' (and optional 'overrides')")
    unknown = set(m) - METHOD_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(METHOD_KEYS)}")
    over = m.get("overrides") or []
    _check_overrides(over, f"{where}.overrides")
    config = resolve_path(m["config"], f"{where}.config")
    if m.get("tiny") and m.get("toy"):
        raise ConfigError(f"{where}: 'tiny' (random weights) and 'toy' (toy-pretrained) exclude each other")
    if m.get("tiny"):
        from zsad.registry import tiny_overrides

        over = [*tiny_overrides(str(load_yaml(config).method.name)), *over]
    if m.get("toy"):
        from zsad.pretrain.cache import toy_overrides

        over = [*toy_overrides(str(load_yaml(config).method.name)), *over]
    return MethodEntry(str(m["name"]), config, tuple(str(o) for o in over))


def _check_overrides(items: Any, where: str) -> None:
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise ConfigError(f"{where} must be a list of 'key=value' strings, got {items!r}")


# ---------------------------------------------------------------------------------------------------------------
# expansion


def ablation_files(folder: Path, methods: list[str]) -> dict[str, list[Path]]:
    """Method name → its ablation YAMLs: the method a file sets (``method.name``), else the one its name starts with
    (``<method>_<what>.yaml``; longest method name wins, so ``mpama_x`` belongs to ``mpama``, not ``mpa``).

    Raises:
        ConfigError: a file that names an unknown method, or none and whose name starts with no known method.
    """
    from zsad.registry import REGISTRY

    out: dict[str, list[Path]] = {m: [] for m in methods}
    for f in sorted(folder.glob("*.yaml")):
        named = OmegaConf.select(load_yaml(f), "method.name")
        prefix = max((m for m in REGISTRY if f.stem.startswith(m + "_")), key=len, default=None)
        owner = prefix if named is None else str(named)
        if owner not in REGISTRY:
            raise ConfigError(
                f"{f}: an ablation file name starts with its method's name and '_', or the file sets method.name "
                f"(one of {sorted(REGISTRY)})"
            )
        if owner in out:
            out[owner].append(f)
        else:
            log.info("ablation %s: method %s is not in this bench; skipped", f.name, owner)
    return out


def expand(spec: BenchSpec, cli_overrides: list[str] = ()) -> list[GridRun]:
    """The grid's runs in leaderboard order: protocol, then method (default before its ablations), then seed."""
    cli = [o for o in cli_overrides if not o.startswith("bench.")]
    _check_overrides(list(cli), "command-line overrides")
    rows: list[tuple[str, MethodEntry, list[Path]]] = []
    ablations = ablation_files(spec.ablations, [m.name for m in spec.methods]) if spec.ablations else {}
    for m in spec.methods:
        rows.append((m.name, m, [m.config], []))
        for f in ablations.get(m.name, []):
            # metrics.json names the ablation through `variant` (unless the ablation file sets its own)
            own = "variant" in OmegaConf.load(f)
            rows.append(
                (f.stem, m, [m.config, f], [] if own else [f"variant={f.stem.removeprefix(m.name + '_')}"])
            )
    runs = []
    for p in spec.protocols:
        for label, m, layers, extra in rows:
            for s in spec.seeds:
                run = GridRun(label, m.name, p, int(s), layers, [])
                run.overrides = [
                    f"protocol={p}",
                    f"seed={s}",
                    f"out_dir={spec.runs_dir}",
                    f"run_name={run.name}",
                    *extra,
                    *spec.overrides,
                    *m.overrides,
                    *cli,
                ]
                runs.append(run)
    return runs


def compose_all(runs: list[GridRun]) -> None:
    """Compose every run's config up front; all errors are reported together."""
    errors = []
    for run in runs:
        try:
            run.cfg = compose(run.layers, run.overrides)
            for layer in run.layers[1:]:
                _check_layer_kept(layer, run.cfg)
            name = str(run.cfg.method.name)
            if run.label != name and not run.cfg.variant:  # a spec row such as `toy_hi`: metrics.json says so
                run.cfg.variant = run.label.removeprefix(name + "_")
        except ConfigError as e:
            errors.append(f"  {run.name}: {e}")
    if errors:
        raise ConfigError("the bench grid does not compose:\n" + "\n".join(errors))


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, node)]


def _check_layer_kept(layer: Path, cfg: DictConfig) -> None:
    """An ablation is a YAML layer under the bench's overrides: refuse one whose setting an override undoes."""
    raw = OmegaConf.to_container(OmegaConf.load(layer), resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key, value in _leaves(raw):
        if isinstance(value, str) and "${" in value:
            continue
        got = resolved
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        if got != value:
            raise ConfigError(f"{layer}: sets {key}={value!r} but the bench's overrides make it {got!r}")


# ---------------------------------------------------------------------------------------------------------------
# running


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    for key in RUNTIME_KEYS:
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return cfg


def config_diff(run: GridRun) -> list[str]:
    """Keys whose value in the run folder's saved config differs from the composed one ([] = same or none saved).

    Keys the saved config lacks are not differences: they were added to the schema after the run was made, and a
    new key's default keeps the old behaviour (as with any code change, which does not re-run a finished run).
    """
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return []
    old = dict(_leaves(_comparable(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))))
    new = dict(_leaves(_comparable(OmegaConf.to_container(run.cfg, resolve=True))))
    return [
        f"{k}: {old[k]!r} → {new.get(k, '<absent>')!r}" for k in sorted(old) if old[k] != new.get(k, _ABSENT)
    ]


_ABSENT = object()


def _execute(run: GridRun, force: bool) -> dict[str, Any]:
    """Train + test one run unless reusable; returns its record for results/runs.json."""
    from zsad import run as zrun  # imported here: torch and Lightning load only when something trains

    metrics = run.run_dir / "metrics.json"
    diff = config_diff(run)
    record: dict[str, Any] = {
        "label": run.label,
        "method": run.cfg.method.name,
        "protocol": run.protocol,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
    }
    if metrics.is_file() and not force and not diff:
        return {**record, "status": "reused", "seconds": 0.0}
    fresh = force or bool(diff)
    if diff:
        log.warning(
            "%s: config changed since the run folder was made (%s); re-running from scratch",
            run.name,
            "; ".join(diff[:5]),
        )
    if fresh:  # a fresh run that fails must not leave the old numbers looking current
        metrics.unlink(missing_ok=True)
    (run.run_dir / "error.txt").unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        zrun.train(run.cfg, resume=not fresh)
        if not metrics.is_file():
            raise RuntimeError(f"training finished but wrote no {metrics}")
    except Exception as e:  # noqa: BLE001 — one failing run must not stop the grid
        tb = traceback.format_exc()
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "error.txt").write_text(tb)
        log.error(
            "%s failed: %s: %s (traceback in %s)", run.name, type(e).__name__, e, run.run_dir / "error.txt"
        )
        return {
            **record,
            "status": "failed",
            "seconds": time.perf_counter() - t0,
            "error": f"{type(e).__name__}: {e}",
        }
    status = "rerun (config changed)" if diff else ("rerun (forced)" if force else "ran")
    return {**record, "status": status, "seconds": round(time.perf_counter() - t0, 2)}


def _ensure_toy_weights(runs: list[GridRun]) -> None:
    """Build the toy weights (``zsad pretrain``) first when a run loads them and they are missing or stale."""
    from zsad.pretrain.cache import referenced

    if referenced([OmegaConf.to_container(r.cfg.method, resolve=True) for r in runs]):
        from zsad.pretrain.build import ensure_toy_weights

        ensure_toy_weights()


def run_bench(
    spec_path: Path, overrides: list[str] = (), force: bool = False, out: Path | None = None
) -> dict[str, Path]:
    """Run the grid of a bench spec and write the leaderboard.

    Args:
        spec_path: a bench YAML (see the module docstring).
        overrides: ``key=value`` for every run; ``bench.<key>=<value>`` changes the spec.
        force: re-run finished runs from scratch.
        out: results folder (default: the spec's ``out``).

    Returns:
        The files written (``md``, ``csv``, ``html``, ``runs`` and the plots).

    Raises:
        ConfigError: the spec or a run's config is wrong (nothing has run).
        BenchFailed: some runs failed; the leaderboard of the others was written first.
    """
    from tqdm.auto import tqdm

    from zsad.results.leaderboard import write_leaderboard

    spec = load_spec(Path(spec_path), list(overrides))
    out = Path(out) if out is not None else spec.out
    runs = expand(spec, list(overrides))
    compose_all(runs)
    _ensure_toy_weights(runs)
    log.info(
        "bench %s: %d runs (%d methods × %d protocols × %d seeds) → %s",
        spec.name,
        len(runs),
        len(runs) // (len(spec.protocols) * len(spec.seeds)),
        len(spec.protocols),
        len(spec.seeds),
        out,
    )
    records = []
    bar = tqdm(runs, desc=f"bench {spec.name}", unit="run", dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run.name)
        rec = _execute(run, force)
        records.append(rec)
        tqdm.write(
            f"[{len(records)}/{len(runs)}] {run.name}: {rec['status']}"
            + (f" — {rec['error']}" if "error" in rec else "")
        )
    bar.close()
    ok = [r for r in records if r["status"] != "failed"]
    failed = [r for r in records if r["status"] == "failed"]
    files = [Path(r["run_dir"]) / "metrics.json" for r in ok]
    written = write_leaderboard(
        files, out, spec.title, labels={f: r["label"] for f, r in zip(files, ok)}, failures=failed
    )
    written["runs"] = out / "runs.json"
    written["runs"].write_text(
        json.dumps({"spec": str(spec.path), "name": spec.name, "runs": records}, indent=1)
    )
    print(
        f"leaderboard: {written['md']}  ({written['html'].name}, {written['csv'].name}, plots in {out / 'plots'})"
    )
    if failed:
        names = ", ".join(f"{r['label']}-{r['protocol']}-s{r['seed']}" for r in failed)
        raise BenchFailed(
            f"zsad bench: {len(failed)} of {len(runs)} runs failed ({names}); see {written['runs']} and each run's error.txt"
        )
    return written
