"""The SFT recipe's checks before training."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.models import ModelError
from sft.train import SFTRecipe
from tests.conftest import StandIn


def test_packing_is_refused_for_a_model_that_cannot_keep_sequences_apart():
    torch.manual_seed(0)
    # learned absolute positions: a model that ignores the restarting position ids shows it at once
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4)).eval()
    recipe = SFTRecipe.__new__(SFTRecipe)  # only what _check_packing reads
    recipe.device, recipe.packing_probe = torch.device("cpu"), [[1, 5, 9, 13, 2], [1, 7, 8, 2]]
    recipe.engine = StandIn(model, model)
    recipe._check_packing()  # the real model passes
    recipe.engine = StandIn(model, lambda position_ids=None, **kwargs: model(**kwargs))
    with pytest.raises(ModelError, match="does not keep packed sequences apart.*set data.packing=false"):
        recipe._check_packing()
