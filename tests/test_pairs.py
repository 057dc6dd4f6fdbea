"""Every pretrained pair of open_clip 3.3 (`list_pretrained()`, 196) by name: its architecture is a row of the table
(the `-quickgelu` copies are the same rows with the weights' activation) and its tag resolves to open_clip's source.
The pairs not built yet are listed by name, so the list can only shrink: a family that lands must remove its pairs."""
import pytest

from nets.configs import get_config
from utils.weights import pretrained

# Pairs not built yet (issue 26 built the last families): none.
NOT_YET: set[tuple[str, str]] = set()


def resolved_pairs() -> dict[tuple[str, str], str]:
    """open_clip's (architecture, tag) -> the source this project downloads for it (None: not built yet)."""
    open_clip = pytest.importorskip("open_clip")
    return {(a, t): getattr(pretrained.PRETRAINED.get((pretrained.architecture_of(a), pretrained.clean_tag(t))),
                            "source", None)
            for a, t in open_clip.list_pretrained()}


def test_every_pair_of_open_clip_resolves_by_name_or_is_listed_as_not_yet_built():
    pytest.importorskip("open_clip")
    from open_clip.pretrained import _PRETRAINED

    pairs = resolved_pairs()
    assert len(pairs) == 196
    assert {p for p, source in pairs.items() if source is None} == NOT_YET
    for (arch, tag), source in pairs.items():
        if source is None:
            continue
        cfg = _PRETRAINED[arch][tag]
        assert source in (cfg.get("url"), "hf-hub:" + cfg.get("hf_hub", "").rstrip("/")), (arch, tag)
        get_config(arch)  # `--phi ARCH` builds, -quickgelu names included
        row = pretrained.PRETRAINED[(pretrained.architecture_of(arch), pretrained.clean_tag(tag))]
        # the phi built for the pair has the activation the weights were trained with
        built = pretrained.phi_with_activation(arch, row.activation, f"{arch} {tag}")
        assert pretrained.activation_of(built) == row.activation, (arch, tag)
    print(f"\n{len(pairs) - len(NOT_YET)} of {len(pairs)} pairs resolve; not yet: {len(NOT_YET)}")
