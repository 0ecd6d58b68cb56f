"""Where the Hydra configs live, and how `recipe=<name>` finds the files in the top-level `recipes/` folder.

Config groups (model, task, objective, lora, sampler, trainer, logger, eval) are folders under `configs/`.
Recipes are `# @package _global_` files in `recipes/`; they are registered as the Hydra group `recipe`, so
`python -m dgtune.train recipe=sudoku` works from any directory, from a source checkout or an installed wheel
(which carries both folders inside the package as `dgtune/configs` and `dgtune/recipes`).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for cand in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"dgtune cannot find its {name}/ folder next to {PACKAGE_DIR}")


def config_dir() -> Path:
    """The folder with `config.yaml` and the config groups."""
    return _find("configs")


def recipes_dir() -> Path:
    """The folder with the recipes."""
    return _find("recipes")


def register_configs() -> list[str]:
    """Register in Hydra's ConfigStore what is not a file under `configs/`: the schemas of the `sampler` and
    `objective` groups (`sampler/base` = `SamplerConfig`, `objective/base` = `ObjectiveConfig`, which each of their
    YAMLs starts from: defaults in one place, a mistyped key or a value of the wrong type an error at compose time)
    and every `recipes/*.yaml` as option `recipe=<stem>` (package _global_); also the OmegaConf resolvers of the
    sweeper configs (`dgtune.sweep.register_resolvers`). Returns the recipe names."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from dgtune.diffusion.objective import ObjectiveConfig
    from dgtune.sampling.config import SamplerConfig
    from dgtune.sweep import register_resolvers

    register_resolvers()

    cs = ConfigStore.instance()
    cs.store(group="sampler", name="base", node=SamplerConfig)
    cs.store(group="objective", name="base", node=ObjectiveConfig)
    names = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="recipe", name=path.stem, node=node, package="_global_")
        names.append(path.stem)
    return names


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose the config as the CLI would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)
