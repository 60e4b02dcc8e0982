"""python -m ppo [key=value ...]   |   deepspeed --num_gpus N --module ppo ...   |   torchrun ... -m ppo"""

from core import dist

dist.prepare_hydra_argv()  # before Hydra parses argv: launcher args, process group, shared run dir

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ppo.config  # noqa: E402,F401  (registers the schema)
from core.cli import reported  # noqa: E402
from ppo.train import PPORecipe  # noqa: E402


@hydra.main(config_path="../conf", config_name="ppo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("ppo"):  # a setting to fix: its message, not a traceback
        recipe = PPORecipe(cfg)
        recipe.setup()
        recipe.train()
        recipe.cleanup()


if __name__ == "__main__":
    main()
    dist.shutdown()  # after every job of a multirun; before the interpreter tears gloo down
