from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmops.api.dataset import Normalization
from llmops_trainer.data.normalize import Normalizer


def test_unicode_controls_and_whitespace() -> None:
    normalize = Normalizer(Normalization())
    text = "\ufeffCaf\u0065\u0301  au\tlait\x00 \r\nsecond line   \n\n\n\nthird\u200b"
    assert normalize(text) == "Café au lait\nsecond line\n\nthird"


def test_mojibake_and_nfkc() -> None:
    normalize = Normalizer(Normalization())
    assert normalize("It\u00e2\u20ac\u2122s \ufb01ne") == "It\u2019s fine"


def test_options_are_honoured() -> None:
    keep = Normalizer(Normalization(unicode="none", collapse_whitespace=False, lowercase=True))
    assert keep("A  B\u0301") == "a  b\u0301"


@given(st.text())
def test_idempotent(text: str) -> None:
    normalize = Normalizer(Normalization())
    once = normalize(text)
    assert normalize(once) == once
