"""Stage 3: PPO with actor, critic, reference and reward models. Not built yet: see the open issue."""
