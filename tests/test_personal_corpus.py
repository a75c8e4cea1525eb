"""The chitchat loader reads the package's real file; malformed files are one-line errors naming the file."""

import json

import pytest

from edgecloud.errors import UserError
from edgecloud.personal.chitchat import load_conversations, senders


def test_real_corpus_counts():
    convs = load_conversations()
    assert len(convs) == 7168
    per = senders(convs)
    assert len(per) == 1315
    # turns inside a conversation alternate senders (consecutive messages of one sender are one turn)
    assert all(a.sender != b.sender for c in convs[:500] for a, b in zip(c, c[1:]))
    assert all(c[0].timestamp <= d[0].timestamp for c, d in zip(convs, convs[1:]))


def test_malformed_file(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="line 1"):
        load_conversations(str(bad))
    bad.write_text(json.dumps({"c1": {"messages": [[{"text": "hi"}]]}}))
    with pytest.raises(UserError, match="c1 is malformed"):
        load_conversations(str(bad))
