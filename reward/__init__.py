"""Stage 2: reward-model training on preference pairs, Bradley-Terry (`python -m reward`)."""
