"""Find, parse and check llm-compressor pruning recipes before any model work starts.

llm-compressor parses a recipe lazily inside `oneshot` and silently skips keys it does not
recognise, and its modifiers accept sparsities outside (0, 1) and targets that match nothing.
The checks here turn those into errors that name the recipe file and say what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sd2_hf.pruning.config import PruneInputError
from sd2_hf.utils.yamlfile import YAMLFileError, load_yaml_file

# Shipped recipes live in the repository's `recipes/pruning/` (a source checkout or an
# editable install; the package itself carries no data files).
SHIPPED_RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes" / "pruning"


def shipped_recipes() -> dict[str, Path]:
    """Short name (file stem) → path of every recipe in `recipes/pruning/`."""
    if not SHIPPED_RECIPES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SHIPPED_RECIPES_DIR.glob("*.yaml"))}


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the short name of a shipped recipe (`sparsegpt-50`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    names = ", ".join(shipped) or "(none found)"
    if path.suffix in (".yaml", ".yml", ".json") or "/" in name_or_path:
        raise PruneInputError(
            f"recipe file {name_or_path!r} does not exist; pass an existing llm-compressor "
            f"recipe file or one of the shipped recipes: {names}"
        )
    raise PruneInputError(
        f"unknown recipe {name_or_path!r}; shipped recipes: {names} "
        "(or pass the path of an llm-compressor recipe YAML)"
    )


# Modifiers whose masks llm-compressor applies only at optimizer steps (training-time
# schedules); `oneshot` alone leaves the weights dense with them.
SCHEDULED_MODIFIERS = ("MagnitudePruningModifier",)


@dataclass
class LoadedRecipe:
    path: Path
    recipe: object  # llmcompressor.recipe.Recipe (imported lazily: heavy)

    @property
    def modifiers(self) -> list:
        return list(self.recipe.modifiers)

    @property
    def scheduled(self) -> bool:
        """True when the recipe prunes with a training-time schedule (applied at step 0)."""
        return any(type(m).__name__ in SCHEDULED_MODIFIERS for m in self.modifiers)

    @property
    def needs_calibration(self) -> bool:
        return any(getattr(m, "requires_calibration_data", False) for m in self.modifiers)

    @property
    def targets(self) -> list[str]:
        return _unique(t for m in self.modifiers for t in _as_list(getattr(m, "targets", None)))

    @property
    def ignore(self) -> list[str]:
        return _unique(t for m in self.modifiers for t in _as_list(getattr(m, "ignore", None)))

    def yaml(self) -> str:
        """The recipe as run (after any sparsity override), in llm-compressor's format."""
        return self.recipe.yaml()


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _sparsity_fields(modifier) -> list[str]:
    return [f for f in ("sparsity", "init_sparsity", "final_sparsity") if hasattr(modifier, f)]


def load_recipe(name_or_path: str, sparsity: float | None = None) -> LoadedRecipe:
    """Parse a recipe with llm-compressor, apply a sparsity override and check its values."""
    from llmcompressor.recipe import Recipe

    path = resolve_recipe(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        try:  # llm-compressor's own message locates the error in "<unicode string>"
            load_yaml_file(path, "pruning recipe")
        except YAMLFileError as err:
            raise PruneInputError(str(err)) from None
    try:
        recipe = Recipe.create_instance(str(path))
    except Exception as err:  # llm-compressor raises ValueError, ValidationError, YAMLError...
        raise PruneInputError(f"llm-compressor rejected recipe {path}: {err}") from err
    if not recipe.modifiers:
        raise PruneInputError(
            f"recipe {path} defines no modifiers; llm-compressor expects "
            "`<name>_stage: {<group>_modifiers: {<ModifierClass>: {...}}}` "
            f"(see {SHIPPED_RECIPES_DIR} for examples)"
        )
    loaded = LoadedRecipe(path=path, recipe=recipe)
    kinds = {type(m).__name__ in SCHEDULED_MODIFIERS for m in loaded.modifiers}
    if len(kinds) > 1:
        names = [type(m).__name__ for m in loaded.modifiers]
        raise PruneInputError(
            f"recipe {path} mixes a training-time schedule ({', '.join(SCHEDULED_MODIFIERS)}) "
            f"with one-shot modifiers: {names}; use one kind per recipe"
        )
    pruning = [m for m in loaded.modifiers if _sparsity_fields(m)]
    if sparsity is not None:
        if not pruning:
            raise PruneInputError(
                f"a sparsity override was given but recipe {path} has no pruning modifier "
                "(one with `sparsity` or `init_sparsity`/`final_sparsity`)"
            )
        for modifier in pruning:
            for name in _sparsity_fields(modifier):
                setattr(modifier, name, sparsity)
    for modifier in pruning:
        _check_sparsity(path, modifier)
    return loaded


def _check_sparsity(path: Path, modifier) -> None:
    kind = type(modifier).__name__
    for name in _sparsity_fields(modifier):
        value = getattr(modifier, name)
        if isinstance(value, dict):
            values = list(value.values())
        elif isinstance(value, (list, tuple)):
            values = list(value)
        else:
            values = [value]
        for v in values:
            if isinstance(v, str) or not 0 < float(v) < 1:
                raise PruneInputError(
                    f"recipe {path}: {kind}.{name} = {v!r} is outside (0, 1); "
                    "sparsity is the fraction of weights set to zero, e.g. 0.5"
                )
    if kind in SCHEDULED_MODIFIERS and modifier.init_sparsity != modifier.final_sparsity:
        raise PruneInputError(
            f"recipe {path}: {kind} has init_sparsity {modifier.init_sparsity} != "
            f"final_sparsity {modifier.final_sparsity}; a one-shot run prunes once, so set "
            "both to the sparsity you want (gradual schedules need training)"
        )


def targeted_linears(model: nn.Module, loaded: LoadedRecipe) -> dict[str, nn.Module]:
    """The linear layers the recipe's modifiers will modify, by module name.

    Mirrors llm-compressor's matching: a target may name a linear layer or a container
    (e.g. a decoder block), whose prunable children are then targeted; `ignore` and
    embeddings are excluded. Raises when a target pattern matches no module.
    """
    from compressed_tensors.utils import is_match
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES

    modules = dict(model.named_modules())
    unmatched = [
        t
        for t in loaded.targets
        if not t.startswith("__") and not any(is_match(n, m, t) for n, m in modules.items())
    ]
    if unmatched:
        raise PruneInputError(
            f"recipe {loaded.path}: target pattern(s) {unmatched} match no module of this "
            f"{type(model).__name__}; its linear layers are named like: "
            f"{', '.join(_linear_name_shapes(model))}"
        )
    found: dict[str, nn.Module] = {}
    for modifier in loaded.modifiers:
        targets = [
            t for t in _as_list(getattr(modifier, "targets", None)) if not t.startswith("__")
        ]
        ignore = _as_list(getattr(modifier, "ignore", None))
        for name, module in modules.items():
            if not targets or not is_match(name, module, targets):
                continue
            for child_name, child in module.named_modules():
                full = f"{name}.{child_name}" if child_name else name
                if (
                    isinstance(child, nn.Embedding)
                    or not is_match(full, child, PRUNABLE_LAYER_TYPES)
                    or (ignore and is_match(full, child, ignore))
                ):
                    continue
                found[full] = child
    if not found:
        raise PruneInputError(
            f"recipe {loaded.path}: targets {loaded.targets} (ignore {loaded.ignore}) select "
            f"no linear layer; linear layers are named like: "
            f"{', '.join(_linear_name_shapes(model))}"
        )
    return found


def _linear_name_shapes(model: nn.Module) -> list[str]:
    """Linear module names with block indices folded (`model.layers.N.mlp.up_proj`)."""
    names = (
        re.sub(r"\.\d+\.", ".N.", name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    )
    return _unique(names)
