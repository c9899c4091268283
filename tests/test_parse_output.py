"""parse_answer and answer_closed over the kinds of output a half-trained or chatty model writes."""

from __future__ import annotations

import pytest

from gputwin.core.data import Entity
from gputwin.core.encoding import answer_closed, answer_text, parse_answer

P, E, PH = "PERSON", "EMAIL", "PHONE"

# (generated text, expected (type, value) pairs, expected ok, expected answer_closed)
CASES = [
    ('[{"type":"PERSON","value":"John Smith"}]', [(P, "John Smith")], True, True),
    ("[]", [], True, True),
    ("  []\n", [], True, True),
    ('```json\n[{"type": "EMAIL", "value": "a@b.io"}]\n```', [(E, "a@b.io")], True, True),
    ('```\n[{"type":"PHONE","value":"555 0100"}]', [(PH, "555 0100")], True, True),
    ('Sure! Here is the PII: [{"type":"PERSON","value":"Ann"}]', [(P, "Ann")], True, True),
    ('[{"type":"PERSON","value":"Ann"}]\nThese are all the entities [1].', [(P, "Ann")], True, True),
    ('[{"type":"PERSON","value":"Ann"}]<|im_end|>garbage', [(P, "Ann")], True, True),
    ('The [redacted] items are: [{"type":"EMAIL","value":"x@y.z"}]', [(E, "x@y.z")], True, True),
    # cut off at the token limit: complete objects are kept
    ('[{"type":"PERSON","value":"Ann"},{"type":"EMAIL","value":"ann@ex', [(P, "Ann")], True, False),
    ('[{"type":"PERSON","value":"Ann"},', [(P, "Ann")], True, False),
    ('[{"type":"PERS', [], True, False),
    ("[", [], True, False),
    # Python literals and loose JSON
    ("[{'type': 'PERSON', 'value': \"O'Brien\"}]", [(P, "O'Brien")], True, True),
    ("[{'type': 'PHONE', 'value': '555'},]", [(PH, "555")], True, True),
    ('[{"type":"PERSON","value":"Ann"},]', [(P, "Ann")], True, True),
    # nested and escaped quotes, brackets inside values
    ('[{"type":"PERSON","value":"Bob \\"the [boss]\\" Lee"}]', [(P, 'Bob "the [boss]" Lee')], True, True),
    # key aliases and type spelling
    ('[{"label":"person","text":"Ann"}]', [(P, "Ann")], True, True),
    ('[{"entity":"EMAIL","text":"a@b.c"}]', [(E, "a@b.c")], True, True),
    ('[{"type":"PERSON","entity":"Ann"}]', [(P, "Ann")], True, True),
    ('[{"entity_type":"phone number","value":"555"}]', [("PHONE_NUMBER", "555")], True, True),
    ('[["PERSON","Ann"]]', [(P, "Ann")], True, True),
    ('{"entities":[{"type":"PHONE","value":"1"}]}', [(PH, "1")], True, True),
    ('{"type":"PHONE","value":"1"}', [(PH, "1")], True, False),
    # items that are not entities are dropped, the rest kept
    ('[{"type":"PERSON"},{"value":"x"},"Ann",{"type":"PERSON","value":" Bo "}]', [(P, "Bo")], True, True),
    # Chinese text
    ('[{"type":"PERSON","value":"张三"},{"type":"ADDRESS","value":"北京市朝阳区"}]',
     [(P, "张三"), ("ADDRESS", "北京市朝阳区")], True, True),
    ("[{'type':'PERSON','value':'李四'}]", [(P, "李四")], True, True),
    # thinking blocks are skipped
    ('<think>maybe [x</think>\n[{"type":"PERSON","value":"Ann"}]', [(P, "Ann")], True, True),
    # unreadable
    ("", [], False, False),
    ("No PII found.", [], False, False),
    ("garbage ] text", [], False, False),
    ("[1, 2, 3]", [], False, True),
    ("[not json at all]", [], False, False),
]


@pytest.mark.parametrize("generated,expected,ok,closed", CASES)
def test_parse_answer_table(generated, expected, ok, closed):
    entities, parsed_ok = parse_answer(generated)
    assert [(e.type, e.value) for e in entities] == expected
    assert parsed_ok is ok
    assert answer_closed(generated) is closed


def test_round_trip_of_answer_text():
    gold = [Entity(P, 'Zoë "Z" O\'Neil', 0, 14), Entity(E, "z@例子.cn", 20, 28)]
    assert parse_answer(answer_text(gold)) == ([Entity(P, gold[0].value), Entity(E, gold[1].value)], True)


def test_answer_closed_grows_with_the_answer():
    full = answer_text([Entity(P, "Ann ]", 0, 5), Entity(E, "a@b.c", 6, 11)])
    closes_at = [k for k in range(1, len(full) + 1) if answer_closed(full[:k])]
    assert closes_at == [len(full)]
