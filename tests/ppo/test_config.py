import re
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_every_ppo_key_has_a_comment_above_it():
    """The issue's documentation rule for the PPO knobs: a comment line directly above every
    value in conf/ppo.yaml (section headers and the defaults list excepted)."""
    lines = (CONF / "ppo.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith(("#", "- ")) or text.endswith(":"):
            continue  # blank, comment, a defaults entry, or a section header
        if re.match(r"^\s*[\w@./-]+:", line) and not lines[i - 1].strip().startswith("#"):
            missing.append(f"line {i + 1}: {text}")
    assert not missing, "no comment above: " + "; ".join(missing)
