"""The README's first command runs the backbone demo; it must keep working."""

from lisendiff_jax.backbone import demo


def test_backbone_demo_runs_and_matches(capsys):
    demo.main(["--new-tokens", "8"])
    out = capsys.readouterr().out
    assert "identical to transformers.generate: True" in out
