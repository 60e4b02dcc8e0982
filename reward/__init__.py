"""Stage 2: reward-model training on preference pairs (Bradley-Terry). Not built yet: see the open issue."""
