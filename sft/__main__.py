"""python -m sft [key=value ...]   |   deepspeed --num_gpus N --module sft ...   |   torchrun ... -m sft"""

from core import dist

dist.prepare_hydra_argv()  # before Hydra parses argv: launcher args, process group, shared run dir

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import sft.config  # noqa: E402,F401  (registers the schema)
from core.cli import reported  # noqa: E402
from sft.train import SFTRecipe  # noqa: E402


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("sft"):  # a setting to fix: its message, not a traceback
        recipe = SFTRecipe(cfg)
        recipe.setup()
        recipe.train()
        recipe.cleanup()


if __name__ == "__main__":
    main()
    dist.shutdown()  # after every job of a multirun; before the interpreter tears gloo down
