"""python -m reward [key=value ...]   |   deepspeed --num_gpus N --module reward ...   |   torchrun ... -m reward"""

from core import dist

dist.prepare_hydra_argv()  # before Hydra parses argv: launcher args, process group, shared run dir

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import reward.config  # noqa: E402,F401  (registers the schema)
from core.cli import reported  # noqa: E402
from reward.train import RewardRecipe  # noqa: E402


@hydra.main(config_path="../conf", config_name="reward", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("reward"):  # a setting to fix: its message, not a traceback
        recipe = RewardRecipe(cfg)
        recipe.setup()
        recipe.train()
        recipe.cleanup()


if __name__ == "__main__":
    main()
    dist.shutdown()  # after every job of a multirun; before the interpreter tears gloo down
