"""docs/config-reference.md is generated from the config schemas and must match them."""

from pathlib import Path

from alignkit.reference import config_reference
from alignkit.stages import stage_kinds

DOC = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"


def test_the_config_reference_is_current():
    """Regenerate with ``alignkit config-reference > docs/config-reference.md``."""
    assert DOC.read_text() == config_reference(stage_kinds())


def test_the_reference_names_every_field_with_its_description():
    text = config_reference(stage_kinds())
    ppo = text.split("## `ppo`")[1].split("\n## ")[0]
    assert "| `kl_coef` | `0.05` | Per-token KL penalty coefficient" in ppo
    assert "| `rollout` | block `PPORolloutSpec` |" in ppo
    assert "## block `ColocatedVLLMConfig`" in text  # blocks inside blocks are listed too
    assert "| `seed` | `0` | The engine's seed" in text.split("## block `ColocatedVLLMConfig`")[1]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and not [r for r in rows if r.endswith("|  |")]  # none undocumented
