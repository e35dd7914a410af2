from __future__ import annotations

import pytest

from llmops_trainer.data.language import UNKNOWN, detect


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("The keeper climbed the tower every morning and wrote the weather in a book.", "en"),
        ("Le gardien montait chaque matin en haut de la tour et notait le temps.", "fr"),
        ("Der Wärter stieg jeden Morgen auf den Turm und schrieb das Wetter auf.", "de"),
    ],
)
def test_detects(text: str, code: str) -> None:
    language, confidence = detect(text * 3)
    assert language == code
    assert confidence > 0.5


def test_undecided() -> None:
    assert detect("1234 5678 ++ --") == (UNKNOWN, 0.0)
    assert detect("\ud800 broken surrogate")[0] in (UNKNOWN, "en")
