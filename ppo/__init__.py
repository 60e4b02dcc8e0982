"""Stage 3: PPO with actor, critic, reference and reward models (InstructGPT). Run: python -m ppo"""
