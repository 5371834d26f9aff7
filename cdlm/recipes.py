"""Named YAML recipes → one validated :class:`cdlm.config.RunConfig`.

A recipe is a YAML file with the sections of :class:`RunConfig`. It may derive from another recipe with
``extends: NAME_OR_FILE`` (child keys win, nested sections merge). Overrides are ``KEY=VALUE`` strings
(``train.lr=3e-4``) whose value is parsed as YAML. Every problem is reported at once, one line each, naming
the file or override it came from, the field, what was expected and what was found.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cdlm.config import RunConfig
from cdlm.errors import PluginError, RecipeError
from cdlm.interfaces import MethodSpec
from cdlm.registry import get_method


def recipes_dir() -> Path:
    """Return the directory of the named recipes shipped with cdlm."""
    return Path(str(resources.files("cdlm_recipes")))


def list_recipes() -> dict[str, str]:
    """Return ``{name: description}`` for every named recipe, sorted by name."""
    out = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        out[path.stem] = str(read_with_extends(path).get("description", ""))
    return out


def resolve(name_or_path: str | Path, *, relative_to: Path | None = None) -> Path:
    """Return the YAML file of a recipe name (``elf-tiny``) or a path to a recipe file."""
    named = recipes_dir() / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path
    names = list(list_names())
    hint = difflib.get_close_matches(str(name_or_path), names, n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    raise RecipeError(
        f"recipe {str(name_or_path)!r} not found: it is neither a named recipe ({', '.join(names)}) nor a file"
        f"{did_you_mean}"
    )


def list_names() -> list[str]:
    """Return the names of the shipped recipes."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at the top level, found {type(raw).__name__}")
    return raw


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_with_extends(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file and the chain of recipes it ``extends``, merged (child keys win)."""
    if path.resolve() in _seen:
        chain = " → ".join(str(p) for p in (*_seen, path.resolve()))
        raise RecipeError(f"{path}: 'extends' forms a cycle: {chain}")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = read_with_extends(resolve(str(parent), relative_to=path.parent), (*_seen, path.resolve()))
    base.pop("description", None)
    return _merge(base, raw)


def set_dotted(raw: dict[str, Any], item: str, *, shown: str | None = None) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict; the value is parsed as YAML.

    Args:
        raw: the nested mapping to change in place.
        item: the ``KEY=VALUE`` override.
        shown: the override as the user wrote it, for error messages (default ``item``).
    """
    shown = item if shown is None else shown
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {shown}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {shown}: the value is not valid YAML: {err}") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {shown}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _set_in_stage(raw: dict[str, Any], item: str) -> None:
    """Apply ``stages.NAME.a.b=value`` to the overrides of the stage called NAME."""
    key, _, text = item.partition("=")
    parts = key.strip().split(".", 2)
    stages = [s for s in raw.get("stages") or [] if isinstance(s, dict)]
    names = [s.get("name") for s in stages]
    if len(parts) < 3:
        raise RecipeError(f"--set {item}: expected stages.NAME.SECTION.FIELD=VALUE, e.g. stages.vae.train.steps=300")
    if parts[1] not in names:
        raise RecipeError(f"--set {item}: the recipe has no stage {parts[1]!r}; its stages are {names}")
    stage = stages[names.index(parts[1])]
    overrides = stage.setdefault("overrides", {})
    if not isinstance(overrides, dict):
        raise RecipeError(f"--set {item}: stage {parts[1]!r} has overrides that are not a mapping")
    set_dotted(overrides, f"{parts[2]}={text}", shown=item)


def check_overrides(overrides: object, where: str = "overrides") -> list[str]:
    """Return ``overrides`` as a list of strings, refusing one bare string (which would iterate characters).

    Raises:
        RecipeError: ``overrides`` is a string, or not a sequence of strings.
    """
    if isinstance(overrides, str):
        raise RecipeError(
            f"{where}={overrides!r}: expected a list of KEY=VALUE strings, got one string; "
            f"write {where}=[{overrides!r}]"
        )
    if not isinstance(overrides, Sequence) or not all(isinstance(o, str) for o in overrides):
        raise RecipeError(f"{where}: expected a list of KEY=VALUE strings, got {overrides!r}")
    return list(overrides)


def _field_names(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Return the field names valid at the parent of ``loc`` (for did-you-mean hints)."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _describe(err: Mapping[str, Any], model: type[BaseModel], prefix: tuple[str, ...], owner: str = "") -> str:
    """Render one pydantic error as ``field: problem``; ``owner`` follows "unknown field" (whose fields they are)."""
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(prefix + loc)
    if err["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc[-1], _field_names(model, loc), n=1)
        return f"{dotted}: unknown field{owner}" + (f"; did you mean {hint[0]!r}?" if hint else "")
    found = err.get("input")
    found_text = "" if err["type"] == "missing" else f", got {found!r}"
    return f"{dotted}: {err['msg'].lower()}{found_text}"


def _source_of(dotted: str, overrides: Sequence[str], path: Path | None) -> str:
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"--set {item}"
    return str(path) if path is not None else "<config>"


def validate(raw: Mapping[str, Any], *, path: Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a raw recipe mapping: core sections, the method's ``model:`` and ``sample:``, cross-section rules.

    The method's ``MethodSpec.config_cls`` validates ``model:``, its ``sample_config_cls`` validates ``sample:``
    (a setting the method does not use is an unknown field, named with the method), and ``MethodSpec.check``
    the rules between sections.

    Raises:
        RecipeError: one line per problem, each naming its source (file or override), field and expectation.
    """
    problems: list[tuple[str, str]] = []

    def report(err: ValidationError, model: type[BaseModel], prefix: tuple[str, ...], owner: str = "") -> None:
        for e in err.errors():
            line = _describe(e, model, prefix, owner)
            problems.append((_source_of(line.split(":")[0], overrides, path), line))

    try:  # the sample section is the method's: validated below with its class
        config: RunConfig | None = RunConfig.model_validate({k: v for k, v in raw.items() if k != "sample"})
    except ValidationError as err:
        report(err, RunConfig, ())
        config = None
    method_name = raw.get("method")
    spec = None
    if isinstance(method_name, str):
        try:
            spec = get_method(method_name)
        except PluginError as err:
            problems.append((_source_of("method", overrides, path), f"method: {err}"))
    if spec is not None:
        sections = {}
        settings = ", ".join(spec.sample_config_cls.model_fields)
        owners = {"model": "", "sample": f" for method {spec.name!r} (its sample settings: {settings})"}
        for name, cls in (("model", spec.config_cls), ("sample", spec.sample_config_cls)):
            try:
                sections[name] = cls.model_validate(raw.get(name) or {})
            except ValidationError as err:
                report(err, cls, (name,), owners[name])
        if config is not None and len(sections) == 2:
            config = config.model_copy(update=sections)
            for fields, problem in cross_section_problems(spec, config):
                sources = [_source_of(f, overrides, path) for f in fields]
                source = next((s for s in sources if s.startswith("--set")), sources[0])
                problems.append((source, f"{fields[0]}: {problem}"))
    if problems or config is None:
        raise RecipeError("\n".join(f"{source}: {line}" for source, line in problems))
    stage_errors = []
    for stage in config.stages:
        try:
            stage_config(config, stage.name)
        except RecipeError as err:
            source = _source_of(f"stages.{stage.name}", overrides, path)
            for line in str(err).splitlines():
                stage_errors.append(f"{source}: stages.{stage.name}: {line.removeprefix('<config>: ')}")
    if stage_errors:
        raise RecipeError("\n".join(stage_errors))
    return config


def cross_section_problems(spec: MethodSpec, config: RunConfig) -> list[tuple[tuple[str, ...], str]]:
    """Return the method's cross-section problems of ``config`` as (dotted fields involved, problem) pairs."""
    return list(spec.check(config)) if spec.check is not None else []


def raw_config(config: RunConfig) -> dict[str, Any]:
    """Return the config as a plain mapping (what a recipe file or a `config.json` holds)."""
    data = config.model_dump(mode="json")
    if isinstance(config.model, BaseModel):
        data["model"] = config.model.model_dump(mode="json")
    return data


def stage_config(config: RunConfig, name: str) -> RunConfig:
    """Return the single-stage config of stage ``name``: the recipe with that stage's overrides merged in.

    Raises:
        RecipeError: no stage has that name, or the merged config is invalid.
    """
    names = [stage.name for stage in config.stages]
    if name not in names:
        raise RecipeError(f"stage {name!r} not found; the recipe's stages are {names}")
    raw = raw_config(config)
    raw["stages"] = []
    overrides = config.stages[names.index(name)].overrides
    return validate(_merge(raw, overrides), path=None, overrides=())


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a named recipe or a recipe file, apply ``--set`` style overrides and validate.

    Args:
        name_or_path: a shipped recipe name (``elf-tiny``) or a path to a YAML file.
        overrides: ``KEY=VALUE`` strings applied in order (``train.steps=10``); they also win over the values a
            recipe's ``stages`` set for the same key. ``stages.NAME.KEY=VALUE`` sets one stage's value
            (``stages.vae.train.steps=1350``).

    Returns:
        The validated run configuration.
    """
    path = resolve(name_or_path)
    return with_overrides(read_with_extends(path), overrides, path=path)


def with_overrides(raw: Mapping[str, Any], overrides: Sequence[str] = (), *, path: Path | None = None) -> RunConfig:
    """Apply ``--set`` style overrides to a raw recipe mapping (a copy) and validate it.

    Args:
        raw: the recipe as read (a YAML file, a checkpoint's ``config.json``, a released checkpoint's inference).
        overrides: ``KEY=VALUE`` strings applied in order; they win over the recipe's stage values too.
        path: where ``raw`` came from, named in errors.
    """
    overrides = check_overrides(overrides)
    raw = copy.deepcopy(dict(raw))
    for item in overrides:
        if item.strip().startswith("stages."):
            _set_in_stage(raw, item)
            continue
        set_dotted(raw, item)
        _unset_in_stages(raw, item.partition("=")[0].strip())
    return validate(raw, path=path, overrides=overrides)


def _unset_in_stages(raw: dict[str, Any], key: str) -> None:
    """Remove ``key`` from every stage's overrides: a ``--set`` wins over what a recipe's stages set."""
    for stage in raw.get("stages") or []:
        node = stage.get("overrides") if isinstance(stage, dict) else None
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)


def to_yaml(config: RunConfig) -> str:
    """Return the resolved configuration as YAML (what ``cdlm recipes show`` prints and runs record)."""
    return yaml.safe_dump(raw_config(config), sort_keys=False)
